"""Attention backend selection for the Qwen-Image transformer (config key ``attention_backend``).

Backends run through diffusers' attention dispatcher (set per processor, see :func:`configure_attention`).
``auto`` picks,
on CUDA: FlashAttention-3 (``_flash_3``) on Hopper when ``flash_attn_interface`` imports, else
FlashAttention-2 (``flash``) when ``flash_attn`` imports, else PyTorch's own flash kernel
(``_native_flash``); on CPU, ``_native_flash`` (PyTorch has a CPU flash kernel). The flash kernels need
fp16/bf16 on CUDA, so a float32 model on CUDA gets ``native``.

Padded text. Qwen-Image attends over ``[text, image]`` and builds a key mask from the text mask. In
diffusers 0.42 none of ``flash``, ``_flash_3`` and ``_native_flash`` accepts a mask (they raise), and the
``*_varlen`` backends assume the valid keys form a prefix, which is false for ``[text + padding,
image]``, so they would silently drop image tokens; they are refused here. The backbone therefore (1)
drops the mask when no text token is padding (exact), and (2) when padding is present and the chosen
backend cannot take a mask, the attention processor runs that call with the mask-capable ``native``
backend (torch SDPA, which on CUDA uses its memory-efficient kernel with masks). Logged at setup.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from torch import nn

from twinflow.utils.typed_config import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_BACKENDS = ("auto", "native", "_native_math", "_native_efficient", "_native_flash", "flash", "_flash_3")
FLASH_BACKENDS = frozenset({"_native_flash", "flash", "_flash_3"})
"""Flash kernels: they reject an attention mask in diffusers 0.42 and need fp16/bf16 on CUDA."""
MASKED_FALLBACK = "native"


def flash_attn_2_available() -> bool:
    """Whether diffusers can use the ``flash`` backend (the ``flash_attn`` package imports)."""
    from diffusers.utils import is_flash_attn_available, is_flash_attn_version

    return is_flash_attn_available() and is_flash_attn_version(">=", "2.6.3")


def flash_attn_3_available() -> bool:
    """Whether FlashAttention-3's ``flash_attn_interface`` module is importable."""
    return importlib.util.find_spec("flash_attn_interface") is not None


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def resolve_attention_backend(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The diffusers backend name for config value ``requested`` on ``device`` with compute ``dtype``.

    ``auto`` is resolved as in the module docstring; an explicit backend that cannot run here raises
    :class:`ConfigError` naming ``attention_backend`` and what is missing.
    """
    device = torch.device(device)
    if requested not in SUPPORTED_BACKENDS:
        raise ConfigError(
            f"config key 'attention_backend': {requested!r} is not supported; "
            f"expected one of {list(SUPPORTED_BACKENDS)} "
            "(varlen backends are refused: they assume prefix-valid key masks, Qwen-Image's [text, image] mask is not)"
        )
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if device.type != "cuda":
            choice, why = "_native_flash", f"device {device.type} (PyTorch's CPU flash kernel)"
        elif not half:
            choice, why = "native", f"dtype {dtype} on CUDA (flash kernels need fp16/bf16)"
        elif is_hopper(device) and flash_attn_3_available():
            choice, why = "_flash_3", "Hopper GPU with flash_attn_interface (FlashAttention-3)"
        elif flash_attn_2_available():
            choice, why = "flash", "flash_attn (FlashAttention-2) is importable"
        else:
            choice, why = "_native_flash", "no flash-attn package; PyTorch's flash kernel"
        logger.info("attention_backend=auto -> %r: %s", choice, why)
        return choice
    if requested == "flash" and not flash_attn_2_available():
        raise ConfigError(
            "config key 'attention_backend': 'flash' needs the flash-attn>=2.6.3 package, which is not importable"
        )
    if requested == "_flash_3" and not flash_attn_3_available():
        raise ConfigError(
            "config key 'attention_backend': '_flash_3' needs FlashAttention-3's 'flash_attn_interface' module, "
            "which is not importable"
        )
    if requested in ("flash", "_flash_3") and device.type != "cuda":
        raise ConfigError(f"config key 'attention_backend': {requested!r} needs a CUDA device, got {device}")
    if requested in FLASH_BACKENDS and device.type == "cuda" and not half:
        raise ConfigError(
            f"config key 'attention_backend': {requested!r} needs fp16/bf16 on CUDA, the model dtype is {dtype}"
        )
    logger.info("attention_backend=%r", requested)
    return requested


class MaskRoutingProcessor(QwenDoubleStreamAttnProcessor2_0):
    """diffusers' Qwen joint-attention processor that sends calls carrying a text mask to
    :data:`MASKED_FALLBACK` when its configured backend cannot take a mask.

    The choice is made per call from the call's own arguments, so it also holds when gradient
    checkpointing re-runs a block during backward (a per-forward switch would be undone by then).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        configured = self._attention_backend
        mask_free = configured is not None and configured.value in FLASH_BACKENDS
        reroute = encoder_hidden_states_mask is not None and mask_free
        if reroute:
            self._attention_backend = AttentionBackendName(MASKED_FALLBACK)
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)
        finally:
            self._attention_backend = configured


def configure_attention(model: nn.Module, backend: str) -> None:
    """Install a :class:`MaskRoutingProcessor` running ``backend`` on every joint-attention layer.

    The backend is set on the processors themselves rather than through ``model.set_attention_backend``,
    which also changes diffusers' process-wide default backend and so every other diffusers model in the
    process (a plain Qwen-Image model with a text mask would then fail under a flash backend).
    """
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), QwenDoubleStreamAttnProcessor2_0):
            processor = MaskRoutingProcessor()
            processor._attention_backend = AttentionBackendName(backend)
            module.set_processor(processor)
            count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no Qwen joint-attention layers to configure")
    if backend in FLASH_BACKENDS:
        logger.info("attention: %r takes no mask; calls with padded text use %r", backend, MASKED_FALLBACK)
