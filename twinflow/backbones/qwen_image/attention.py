"""Attention backend selection for the Qwen-Image transformer (config key ``attention_backend``), and
joint attention on packed variable-length sequences so that padded text never forces a masked kernel.

Backends run through diffusers' attention dispatcher (set per processor, see :func:`configure_attention`).
``auto`` picks,
on CUDA: FlashAttention-3 (``_flash_3``) on Hopper when ``flash_attn_interface`` imports, else
FlashAttention-2 (``flash``) when ``flash_attn`` imports, else PyTorch's own flash kernel
(``_native_flash``); on CPU, ``_native_flash`` (PyTorch has a CPU flash kernel). The flash kernels need
fp16/bf16 on CUDA, so a float32 model on CUDA gets ``native``.

Padded text. Qwen-Image attends over ``[text, image]``; a text mask (padded prompts, and always when cond
and uncond rows are batched together) would need a key mask, which the flash kernels do not take, and
diffusers' ``*_varlen`` backends assume the valid keys form a prefix, false for ``[text + padding,
image]``. :class:`PackedJointAttnProcessor` therefore drops the padded text tokens and packs each row's
valid text and image tokens (:func:`plan_packing`, once per forward), then attends per packed row
(:func:`packed_attention`). Which kernel runs is chosen in one place, :func:`packed_path`:

* ``varlen_flash_attn``: CUDA, fp16/bf16, a flash backend configured, ``flash_attn`` importable:
  flash-attn's ``flash_attn_varlen_func`` over the packed tokens with ``cu_seqlens``: one launch.
* ``varlen_torch``: the same without flash-attn: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9,
  the GPU machines run 2.11), which calls the FlashAttention-2 kernel that SDPA's flash backend runs,
  with ``cu_seqlens``: one launch, no padding, the same arithmetic as unpadded flash SDPA.
* ``grouped_sdpa``: everywhere else (CPU; float32 on CUDA; an explicit non-flash backend): rows with the
  same number of valid tokens are contiguous in the packed layout, so each group is a dense
  ``(rows, length, heads, dim)`` batch that runs through the configured backend *without* a mask (SDPA
  can pick its flash or memory-efficient kernel). One call per distinct length: a cond + uncond batch
  with right-padded prompts of a few lengths costs a few calls. Alternatives considered: nested-jagged
  tensors with SDPA (torch 2.13, ``torch/nested/_internal/sdpa.py``: on CPU it converts them to strided
  nested tensors for the math kernel, which materialises every score matrix; on CUDA it reaches the same
  ``_flash_attention_forward`` with ``cu_seqlens`` as ``varlen_torch``, through more machinery);
  ``torch.nn.attention.varlen`` on CPU (CUDA only). Measured on the 2-core CPU machine
  (``benchmarks/attention_paths.py --device cpu``, forward + backward, loaded machine): grouped SDPA is
  on par with masked SDPA for a cond + uncond batch and ~15% faster with 8 distinct lengths; nested
  tensors were 3x slower than masked SDPA in the forward alone. On CUDA the gain is the kernel: masked
  SDPA can only use the memory-efficient kernel, the varlen paths run flash attention on valid tokens.

All three paths are exact attention: the packed rows contain exactly the keys that the mask would leave,
so results differ from masked SDPA only in floating-point summation order (tested in float64 on CPU).
Without a text mask, or with one that marks no token as padding, the joint sequence runs through the
configured backend as it is (``dense``). :func:`attention_path_calls` counts the calls per
path for the benchmarks.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)
from torch import nn

from twinflow.utils.typed_config import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_BACKENDS = ("auto", "native", "_native_math", "_native_efficient", "_native_flash", "flash", "_flash_3")
FLASH_BACKENDS = frozenset({"_native_flash", "flash", "_flash_3"})
"""Flash kernels: they reject an attention mask in diffusers 0.42 and need fp16/bf16 on CUDA."""


@functools.cache
def flash_attn_2_available() -> bool:
    """Whether the ``flash`` backend can run: flash-attn >= 2.6.3 is installed *and* its CUDA extension
    imports. diffusers' check reads only the package metadata, so a wheel built for another torch would
    pass it and fail at the first padded batch (undefined symbol); importing the extension here fails at
    start-up instead, and the other paths are used."""
    from diffusers.utils import is_flash_attn_available, is_flash_attn_version

    if not (is_flash_attn_available() and is_flash_attn_version(">=", "2.6.3")):
        return False
    try:
        importlib.import_module("flash_attn_2_cuda")
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, OSError (undefined symbol), ...
        logger.warning("flash-attn is installed but does not import (%s: %s); not using it", type(e).__name__, e)
        return False
    return True


@functools.cache
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


# --- Packed (variable-length) joint attention -------------------------------------------------------

ATTENTION_PATHS = ("dense", "varlen_flash_attn", "varlen_torch", "grouped_sdpa")
"""Every way a joint-attention call can run (see the module docstring). There is no masked path."""

_PATH_CALLS = dict.fromkeys(ATTENTION_PATHS, 0)


def attention_path_calls() -> dict[str, int]:
    """A copy of the process-wide count of joint-attention calls per path (forward calls, including
    the re-run of a block under gradient checkpointing). Counting is a Python integer increment per
    call: no device sync, no tensor. Benchmarks take the difference of two snapshots."""
    return dict(_PATH_CALLS)


@dataclass(frozen=True)
class PackPlan:
    """Where each row's valid tokens sit in the packed layout, built once per forward from the text mask.

    Packed rows are the batch rows sorted (stably) by their number of valid text tokens; packed row
    ``r`` holds that row's valid text tokens (in order) then all its image tokens. ``index`` holds, for
    each packed token, its position in the flattened ``(batch * seq)`` joint sequence; ``cu_seqlens``
    (int32, ``rows + 1``) the packed row boundaries; ``groups`` the runs of consecutive packed rows of
    equal length as ``(first_token, rows, length)``, host integers; ``dense``: no token is padding.
    """

    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    groups: tuple[tuple[int, int, int], ...]
    batch: int
    seq_len: int
    dense: bool


def plan_packing(text_mask: torch.Tensor, image_len: int) -> PackPlan:
    """The :class:`PackPlan` for a (B, T) text mask (any pattern, not only right padding) followed by
    ``image_len`` always-valid image tokens. One device-to-host copy of the mask (B x T booleans); the
    indices are built on the host and copied to the mask's device in one transfer."""
    device = text_mask.device
    mask = text_mask.to("cpu", torch.bool)
    batch, text_len = mask.shape
    seq_len = text_len + image_len
    counts = mask.sum(dim=1)
    order = torch.sort(counts, stable=True).indices
    valid = torch.cat([mask, mask.new_ones(batch, image_len)], dim=1)[order]
    flat = order[:, None] * seq_len + torch.arange(seq_len)
    lengths = counts[order] + image_len
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    groups, first = [], 0
    values, repeats = torch.unique_consecutive(lengths, return_counts=True)
    for length, rows in zip(values.tolist(), repeats.tolist()):
        groups.append((first, rows, length))
        first += rows * length
    return PackPlan(
        index=flat[valid].to(device), cu_seqlens=cu_seqlens.to(device), max_seqlen=int(lengths.max()),
        groups=tuple(groups), batch=batch, seq_len=seq_len, dense=first == batch * seq_len,
    )


@functools.cache
def torch_varlen_available() -> bool:
    """Whether PyTorch has ``torch.nn.attention.varlen.varlen_attn`` (added in 2.9)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def packed_path(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel that runs packed attention for the configured ``backend`` on ``device`` in ``dtype``.

    A varlen kernel runs only where the configured backend is a flash one (the user asked for flash
    attention and the dtype suits it, see :func:`resolve_attention_backend`) on CUDA: flash-attn's when
    the package imports, else PyTorch's own (the same FlashAttention-2 kernels SDPA's flash backend
    uses). Everywhere else (CPU; float32 on CUDA; an explicit ``native``/``_native_math``/... backend)
    the equal-length groups run through the configured backend without a mask.
    """
    if backend in FLASH_BACKENDS and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if flash_attn_2_available():
            return "varlen_flash_attn"
        if torch_varlen_available():
            return "varlen_torch"
    return "grouped_sdpa"


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: PackPlan,
                     backend: AttentionBackendName, path: str | None = None) -> torch.Tensor:
    """Joint attention of (B, S, H, D) ``query``/``key``/``value`` over each row's valid tokens only.

    Equals masked attention with a key mask at every valid query position; padded query positions
    get zeros (their output feeds only padded text tokens, which no valid token attends to, and the
    model's output is the image stream). Differentiable (the packing is an ``index_select``, the
    unpacking an ``index_copy``). ``path`` forces one of the packed kernels (benchmarks, tests); by
    default :func:`packed_path` chooses.
    """
    batch, seq_len, heads, head_dim = query.shape
    if (batch, seq_len) != (plan.batch, plan.seq_len):
        raise ValueError(f"pack plan is for (batch, seq) = {(plan.batch, plan.seq_len)}, got {(batch, seq_len)}")
    path = path or packed_path(backend.value, query.device, query.dtype)
    _PATH_CALLS[path] += 1
    q, k, v = (x.reshape(batch * seq_len, heads, head_dim).index_select(0, plan.index) for x in (query, key, value))
    if path == "varlen_flash_attn":
        # flash-attn 2.x API (>= 2.6.3, the version diffusers' ``flash`` backend requires):
        # flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...),
        # q/k/v (total_tokens, heads, head_dim), int32 cu_seqlens; non-causal, no dropout by default.
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen)
    elif path == "varlen_torch":
        # Positional arguments only: their order is the same from torch 2.9 to 2.13; non-causal default.
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen)
    else:
        parts = []
        for first, rows, length in plan.groups:
            span = slice(first, first + rows * length)
            group = [x[span].view(rows, length, heads, head_dim) for x in (q, k, v)]
            parts.append(dispatch_attention_fn(*group, backend=backend).reshape(rows * length, heads, head_dim))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
    full = out.new_zeros(batch * seq_len, heads, head_dim).index_copy(0, plan.index, out)
    return full.view(batch, seq_len, heads, head_dim)


class PackedJointAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """Qwen-Image's joint text/image attention that never takes a mask.

    The projections, QK norms and RoPE are diffusers' modules and function, applied as diffusers'
    processor applies them (a test checks equality with it). Without a text mask the joint sequence runs
    through the configured backend (``dense``), and so does a mask without padding; with padding, through
    :func:`packed_attention` with the plan passed in ``pack_plan`` (the transformer builds it once per
    forward) or built here.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, pack_plan: PackPlan | None = None):
        if encoder_hidden_states is None:
            raise ValueError("PackedJointAttnProcessor needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("PackedJointAttnProcessor takes the text mask as encoder_hidden_states_mask only")
        head_dim = attn.inner_dim // attn.heads
        streams = (
            (hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, 0),
            (encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
             attn.norm_added_q, attn.norm_added_k, 1),
        )
        qkv = []
        for x, to_q, to_k, to_v, norm_q, norm_k, rope in streams:
            q, k, v = (proj(x).unflatten(-1, (-1, head_dim)) for proj in (to_q, to_k, to_v))
            q = q if norm_q is None else norm_q(q)
            k = k if norm_k is None else norm_k(k)
            if image_rotary_emb is not None:
                freqs = image_rotary_emb[rope]
                q = apply_rotary_emb_qwen(q, freqs, use_real=False)
                k = apply_rotary_emb_qwen(k, freqs, use_real=False)
            qkv.append((q, k, v))
        (img_q, img_k, img_v), (txt_q, txt_k, txt_v) = qkv
        query, key, value = (torch.cat(pair, dim=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        if encoder_hidden_states_mask is not None and pack_plan is None:
            pack_plan = plan_packing(encoder_hidden_states_mask, hidden_states.shape[1])
        if encoder_hidden_states_mask is None or pack_plan.dense:
            _PATH_CALLS["dense"] += 1
            joint = dispatch_attention_fn(query, key, value, backend=self._attention_backend,
                                          parallel_config=self._parallel_config)
        else:
            if self._parallel_config is not None:
                raise NotImplementedError("packed attention does not support diffusers' context parallelism")
            backend = self._attention_backend or AttentionBackendName.NATIVE
            joint = packed_attention(query, key, value, pack_plan, backend)
        joint = joint.flatten(2, 3).to(query.dtype)
        seq_txt = encoder_hidden_states.shape[1]
        img_out = attn.to_out[0](joint[:, seq_txt:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(joint[:, :seq_txt].contiguous())
        return img_out, txt_out


def uses_packed_attention(transformer: nn.Module) -> bool:
    """Whether a Qwen-Image transformer's joint-attention layers run :class:`PackedJointAttnProcessor` (and so
    accept a ``pack_plan``); :func:`configure_attention` installs it on all of them or none."""
    blocks = getattr(transformer, "transformer_blocks", None)
    return bool(blocks) and isinstance(getattr(blocks[0].attn, "processor", None), PackedJointAttnProcessor)


def configure_attention(model: nn.Module, backend: str) -> None:
    """Install a :class:`PackedJointAttnProcessor` running ``backend`` on every joint-attention layer.

    The backend is set on the processors themselves rather than through ``model.set_attention_backend``,
    which also changes diffusers' process-wide default backend and so every other diffusers model in the
    process (a plain Qwen-Image model with a text mask would then fail under a flash backend).
    """
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), QwenDoubleStreamAttnProcessor2_0):
            processor = PackedJointAttnProcessor()
            processor._attention_backend = AttentionBackendName(backend)
            module.set_processor(processor)
            count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no Qwen joint-attention layers to configure")
