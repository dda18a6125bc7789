"""Helpers for the Z-Image backbone tests: tiny models with random weights, built locally."""
import torch
from diffusers import ZImageTransformer2DModel

from twinflow.backbones.z_image.tiny import tiny_transformer_config
from twinflow.backbones.z_image.transformer import TwinFlowZImageTransformer

from qwen_helpers import randomize_

CFG = tiny_transformer_config()
E2_KEYS = ["t_embedder_2.mlp.0.weight", "t_embedder_2.mlp.0.bias", "t_embedder_2.mlp.2.weight", "t_embedder_2.mlp.2.bias"]


def twin_model(seed=0) -> TwinFlowZImageTransformer:
    """A tiny TwinFlow Z-Image transformer with random weights and E2 != E1."""
    torch.manual_seed(seed)
    model = TwinFlowZImageTransformer(**CFG).eval()
    randomize_(model, seed)
    randomize_(model.t_embedder_2, seed + 1, scale=1.0)
    return model


def plain_copy(model: torch.nn.Module) -> ZImageTransformer2DModel:
    """diffusers' own model holding ``model``'s weights (minus t_embedder_2)."""
    plain = ZImageTransformer2DModel(**CFG).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("t_embedder_2.")})
    return plain


def inputs(seed=0, lengths=(5, 9, 3)):
    """Transformer inputs: frames (C, 1, H, W) and captions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(CFG["in_channels"], 1, 6, 8, generator=g) for _ in lengths]
    captions = [torch.randn(n, CFG["cap_feat_dim"], generator=g) for n in lengths]
    return frames, captions


def run(model, t, tt=None, seed=0):
    frames, captions = inputs(seed)
    with torch.no_grad():
        extra = {} if tt is None else {"target_timestep": tt}
        return torch.stack(model(frames, t, captions, return_dict=False, **extra)[0])
