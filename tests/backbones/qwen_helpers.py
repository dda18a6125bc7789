"""Helpers for the Qwen-Image backbone tests: tiny models with random weights, built locally."""
from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel

from twinflow.backbones.qwen_image import QwenCondition
from twinflow.backbones.qwen_image.build import build_qwen_image_backbone
from twinflow.backbones.qwen_image.config import QwenImageBackboneConfig
from twinflow.backbones.qwen_image.tiny import TINY_LATENT_CHANNELS, tiny_transformer_config
from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer
from twinflow.utils.typed_config import from_dict

TEXT_DIM = tiny_transformer_config()["joint_attention_dim"]
C = TINY_LATENT_CHANNELS


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Perturb every parameter so that no test relies on a special initialisation (zero biases...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def twin_model(seed: int = 0, **kwargs) -> TwinFlowQwenImageTransformer:
    """A tiny TwinFlow transformer with random weights and E2 != E1."""
    torch.manual_seed(seed)
    model = TwinFlowQwenImageTransformer(**tiny_transformer_config(), **kwargs).eval()
    randomize_(model, seed)
    if kwargs.get("twin_embedder", True):
        randomize_(model.time_text_embed_2, seed + 1, scale=1.0)
    return model


def plain_copy(model: torch.nn.Module, **kwargs) -> QwenImageTransformer2DModel:
    """diffusers' own model holding ``model``'s weights (minus time_text_embed_2)."""
    plain = QwenImageTransformer2DModel(**tiny_transformer_config(), **kwargs).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("time_text_embed_2.")}
    plain.load_state_dict(state, strict=True)
    return plain


def make_cond(lengths: list[int], seed: int = 0, ref_hw: tuple[int, int] | None = None) -> QwenCondition:
    """A condition whose row i has ``lengths[i]`` valid tokens, right-padded (with noise, so that a
    leak of padding into the result would show) to the longest."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(lengths), max(lengths)
    embeds = torch.randn(batch, length, TEXT_DIM, generator=g)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    ref = None if ref_hw is None else torch.randn(batch, C, *ref_hw, generator=g)
    return QwenCondition(embeds, mask, ref)


def build_tiny(seed: int = 0, **overrides) -> torch.nn.Module:
    """``build_qwen_image_backbone`` on the tiny config (float32, CPU), then random weights."""
    data = {"transformer": tiny_transformer_config(), "dtype": "float32", **overrides}
    torch.manual_seed(seed)
    backbone = build_qwen_image_backbone(from_dict(QwenImageBackboneConfig, data), "cpu")
    return backbone.eval()
