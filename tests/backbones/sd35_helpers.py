"""Helpers for the SD3.5 backbone tests: tiny models with random weights, built locally."""
import torch
from diffusers import SD3Transformer2DModel

from twinflow.backbones.sd35.tiny import tiny_transformer_config
from twinflow.backbones.sd35.transformer import TwinFlowSD3Transformer

from qwen_helpers import randomize_

CFG = tiny_transformer_config()
E2_KEYS = [
    f"time_text_embed_2.{part}.{linear}.{kind}"
    for part in ("timestep_embedder", "text_embedder")
    for linear in ("linear_1", "linear_2")
    for kind in ("weight", "bias")
]


def twin_model(seed=0, **kwargs):
    """A tiny TwinFlow SD3 transformer with random weights and large random E2 weights."""
    torch.manual_seed(seed)
    model = TwinFlowSD3Transformer(**CFG, **kwargs).eval()
    randomize_(model, seed)
    if kwargs.get("twin_embedder", True):
        randomize_(model.time_text_embed_2, seed + 1, scale=1.0)
    return model


def plain_copy(model):
    plain = SD3Transformer2DModel(**CFG).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("time_text_embed_2.")})
    return plain


def inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, CFG["in_channels"], 8, 6, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, CFG["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, CFG["pooled_projection_dim"], generator=g),
        return_dict=False,
    )


def signed_times(batch=3, seed=0):
    """SD3-unit times (1000 x signed TwinFlow times)."""
    g = torch.Generator().manual_seed(seed)
    return 1000 * torch.rand(batch, generator=g) * torch.tensor([1.0, -1.0, 1.0])[:batch]
