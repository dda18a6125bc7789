"""Attention backend selection (config key ``attention_backend``) and padded-text routing."""
import logging

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from twinflow.backbones.qwen_image import attention
from twinflow.backbones.qwen_image.attention import MaskRoutingProcessor, resolve_attention_backend
from twinflow.utils.typed_config import ConfigError

from qwen_helpers import C, build_tiny, make_cond, randomize_


def test_auto_on_this_cpu_machine_picks_native_flash_and_logs_it(caplog):
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert resolve_attention_backend("auto", "cpu", torch.float32) == "_native_flash"
    assert "attention_backend=auto -> '_native_flash'" in caplog.text


@pytest.mark.parametrize(
    "hopper, fa3, fa2, dtype, expected",
    [
        (True, True, True, torch.bfloat16, "_flash_3"),
        (False, True, True, torch.bfloat16, "flash"),
        (True, False, True, torch.bfloat16, "flash"),
        (True, False, False, torch.bfloat16, "_native_flash"),
        (True, True, True, torch.float32, "native"),
    ],
)
def test_auto_preference_order_on_cuda(monkeypatch, hopper, fa3, fa2, dtype, expected):
    monkeypatch.setattr(attention, "is_hopper", lambda device: hopper)
    monkeypatch.setattr(attention, "flash_attn_3_available", lambda: fa3)
    monkeypatch.setattr(attention, "flash_attn_2_available", lambda: fa2)
    assert resolve_attention_backend("auto", "cuda", dtype) == expected


@pytest.mark.parametrize(
    "requested, device, dtype, match",
    [
        ("flash", "cpu", torch.bfloat16, "'attention_backend': 'flash' needs the flash-attn"),
        ("_flash_3", "cpu", torch.bfloat16, "'_flash_3' needs FlashAttention-3's 'flash_attn_interface'"),
        ("flash_varlen", "cpu", torch.bfloat16, "'attention_backend': 'flash_varlen' is not supported"),
        ("_native_flash", "cuda", torch.float32, "needs fp16/bf16 on CUDA"),
    ],
)
def test_unavailable_backend_is_a_config_error(requested, device, dtype, match):
    if requested in ("flash", "_flash_3") and (attention.flash_attn_2_available() or attention.flash_attn_3_available()):
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=match):
        resolve_attention_backend(requested, device, dtype)


def test_explicit_backend_reaches_every_processor_without_global_side_effect():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    backbone = build_tiny(attention_backend="_native_math")
    processors = [m.processor for m in backbone.modules() if hasattr(m, "processor")]
    assert len(processors) == 2 and all(isinstance(p, MaskRoutingProcessor) for p in processors)
    assert all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in processors)
    assert _AttentionBackendRegistry._active_backend == before


@torch.no_grad()
def test_mask_free_backend_routes_padded_calls_to_native():
    flash = build_tiny(attention_backend="_native_flash")
    native = build_tiny(attention_backend="native")
    randomize_(flash, 3)
    native.load_state_dict(flash.state_dict())
    x, t = torch.randn(2, C, 4, 4), torch.rand(2)
    padded = make_cond([2, 5])
    torch.testing.assert_close(flash(x, t, t, padded), native(x, t, t, padded), rtol=1e-5, atol=1e-5)
    processor = next(m.processor for m in flash.modules() if hasattr(m, "processor"))
    assert processor._attention_backend == AttentionBackendName._NATIVE_FLASH
    unpadded = make_cond([5, 5])
    torch.testing.assert_close(flash(x, t, t, unpadded), native(x, t, t, unpadded), rtol=1e-5, atol=1e-5)
