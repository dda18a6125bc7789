"""Helpers for the OpenUni backbone tests: tiny models with random weights, built locally."""
from __future__ import annotations

import torch
from diffusers import SanaTransformer2DModel

from twinflow.backbones.openuni.tiny import tiny_transformer_config
from twinflow.backbones.openuni.tiny_encoders import build_tiny_transformer
from twinflow.backbones.openuni.transformer import TwinFlowSanaTransformer

from qwen_helpers import randomize_

CAPTION = tiny_transformer_config()["caption_channels"]


def twin_sana(seed: int = 0, **kwargs) -> TwinFlowSanaTransformer:
    """A tiny TwinFlow SANA with random weights; ``time_embed_2`` far from its small initialisation."""
    model = build_tiny_transformer(seed, **kwargs).eval()
    randomize_(model, seed)
    if kwargs.get("twin_embedder", True):
        randomize_(model.time_embed_2, seed + 1, scale=1.0)
    return model


def plain_sana(model: torch.nn.Module) -> SanaTransformer2DModel:
    """diffusers' own SANA holding ``model``'s weights (minus ``time_embed_2``)."""
    plain = SanaTransformer2DModel(**tiny_transformer_config()).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("time_embed_2.")})
    return plain


def sana_inputs(batch: int = 3, seed: int = 0, tokens: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, tokens, CAPTION, generator=g),
        return_dict=False,
    )


def signed_timesteps(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """SANA-unit timesteps (1000 t) of signed t."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, generator=g) * torch.tensor([1.0, -1.0, 1.0, -1.0])[:batch] * 1000
