"""End-to-end TwinFlow training step on a Qwen-Image-architecture model: our step against an eager
baseline that runs the reference's pass structure, on the same weights, data and random draws.

Both variants do the same work per step (ALGORITHM.md §3, "Forward passes per step"): the adv one-step
fakes, the main forward and backward, the guidance pair, the N RCGM passes, the rectification pair,
the loss, an optimizer step and one EMA update. Only the batching and fusion differ:

=================  ===========================================  =============================================
part               baseline (as the reference runs it)          ours
=================  ===========================================  =============================================
guidance           two teacher forwards: cond, then uncond      one batched forward (cond + uncond)
rectification      two online forwards: fake, then real         one batched forward
loss arithmetic    eager ``twinflow_loss_reference``            fused Triton loss (``kernels: auto``)
time embedding     eager diffusers modules                      fused Triton dual-time embedding
attention          diffusers' ``native`` (torch SDPA)           ``attention_backend: auto`` (flash kernels)
EMA update         per-tensor loop (``ema_update_reference_``)  one multi-tensor kernel (``ema_update_``)
=================  ===========================================  =============================================

The baseline is :class:`ReferenceOrderObjective`, a subclass of the objective that only replaces the
two batched passes by their unbatched form: it selects the same rows and draws the same random numbers
in the same order, so with equal weights both variants compute the same loss (a test checks this).

The teacher is :class:`ShadowEMATeacher`: a float32 EMA of the trainable parameters plus a copy of the
model in the training dtype that the teacher passes run (the single-device form of the ZeRO-3 trainer's
EMA + shadow). The optimizer (AdamW, identical in both variants) is part of the step.
"""
from __future__ import annotations

import copy
import gc
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from twinflow.backbones.qwen_image.condition import QwenCondition
from twinflow.method.conditioning import index_condition
from twinflow.method.config import TwinFlowConfig
from twinflow.method.ema_schedule import EMADecaySchedule
from twinflow.method.objective import TwinFlowObjective
from twinflow.method.teachers import Teacher

from .harness import Timing, TimingPlan, device_name, peak_bf16_tflops, synchronize

TIME_CHANNELS = 256
VARIANTS = ("baseline", "ours")


def qwen_image_reduced(num_layers: int) -> dict:
    """Qwen-Image's transformer configuration (24 heads x 128 = 3072 wide, text width 3584, 16 latent
    channels in 2x2 patches, RoPE axes 16/56/56) with ``num_layers`` double-stream blocks instead of 60."""
    return {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": num_layers,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 3584,
        "axes_dims_rope": (16, 56, 56),
    }


@dataclass(frozen=True)
class E2ESize:
    transformer: dict
    dtype: str
    batch: int
    latent: tuple[int, int, int]  # C, H, W of the VAE latent
    cond_tokens: int
    uncond_tokens: int
    warmup_steps: int
    steps: int

    @property
    def image_tokens(self) -> int:
        p = self.transformer["patch_size"]
        return (self.latent[1] // p) * (self.latent[2] // p)

    def describe(self) -> str:
        t = self.transformer
        width = t["num_attention_heads"] * t["attention_head_dim"]
        return (f"{t['num_layers']} blocks, width {width} ({t['num_attention_heads']}x{t['attention_head_dim']}), "
                f"text width {t['joint_attention_dim']}, {self.dtype}; batch {self.batch}, latent "
                f"{'x'.join(map(str, self.latent))} = {self.image_tokens} image tokens, "
                f"{self.cond_tokens} prompt tokens, {self.uncond_tokens} negative-prompt tokens")


def e2e_size(profile: str, num_layers: int = 4) -> E2ESize:
    """GPU: 512 px images (64x64 latents, 1024 image tokens), 128-token prompts and a short (6-token)
    negative prompt, batch 8 (two rows per group), ``num_layers`` blocks. Smoke: the tiny 2-block model,
    one timed step (its Triton kernels run in the interpreter, several seconds a step)."""
    if profile == "gpu":
        return E2ESize(qwen_image_reduced(num_layers), "bfloat16", 8, (16, 64, 64), 128, 6, warmup_steps=3, steps=10)
    from twinflow.backbones.qwen_image.tiny import TINY_LATENT_CHANNELS, tiny_transformer_config

    return E2ESize(tiny_transformer_config(), "float32", 4, (TINY_LATENT_CHANNELS, 16, 16), 8, 3, warmup_steps=1, steps=1)


def forward_flops(transformer: dict, image_tokens: int, text_tokens: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one sample's forward through the dual-time Qwen-Image model.

    Per sample: two time embedders (256 -> D -> D); ``img_in`` and ``txt_in``; per block the two
    streams' modulation (D -> 6D, once per sample), their q/k/v/out projections and 4x MLPs (24 S D^2
    over S = image + text tokens) and joint attention (QK^T and AV, 4 S^2 D); ``norm_out`` (D -> 2D) and
    ``proj_out``. Norms, RoPE and elementwise work are left out. Matches torch's FlopCounterMode on the
    tiny model exactly (a test checks it).
    """
    d = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    s = image_tokens + text_tokens
    out_features = transformer["patch_size"] ** 2 * transformer["out_channels"]
    flops = 2 * 2 * (TIME_CHANNELS * d + d * d)
    flops += 2 * image_tokens * transformer["in_channels"] * d + 2 * text_tokens * transformer["joint_attention_dim"] * d
    flops += transformer["num_layers"] * (2 * 2 * d * 6 * d + 24 * s * d * d + 4 * s * s * d)
    flops += 2 * d * 2 * d + 2 * image_tokens * d * out_features
    return flops


def step_flops(size: E2ESize, forward_rows: dict[str, int]) -> dict[str, float]:
    """Model FLOPs of one step: the main pass (forward + backward = 3 forwards over the batch) and every
    pass, from the rows the objective ran. The guidance pass counts half its rows at the negative
    prompt's length (padding to the prompt's length is not useful work)."""
    per_cond = forward_flops(size.transformer, size.image_tokens, size.cond_tokens)
    per_uncond = forward_flops(size.transformer, size.image_tokens, size.uncond_tokens)
    main = 3 * forward_rows.get("main", 0) * per_cond
    guided = forward_rows.get("guidance", 0) // 2
    no_grad_cond = sum(forward_rows.get(k, 0) for k in ("adv_fake", "image_free", "rcgm", "rectification")) + guided
    total = main + no_grad_cond * per_cond + guided * per_uncond
    return {"main_pass_flop": float(main), "step_flop": float(total)}


class ShadowEMATeacher(Teacher):
    """Float32 EMA of the trainable parameters and a copy of the model (the *shadow*, in the training
    dtype) that the teacher passes run. ``update`` writes the EMA and the shadow in one call: the fused
    multi-tensor kernel (``backend`` auto/triton) or the eager per-tensor loop (``backend`` eager)."""

    def __init__(self, model: torch.nn.Module, decay_rate: float, backend: str):
        shadow = copy.deepcopy(model).requires_grad_(False).eval()
        super().__init__(shadow)
        pairs = [(p, s) for p, s in zip(model.parameters(), shadow.parameters()) if p.requires_grad]
        self.online = [p for p, _ in pairs]
        self.shadow = [s for _, s in pairs]
        self.ema = [p.detach().float().clone() for p in self.online]
        self.schedule = EMADecaySchedule(decay_rate)
        self.backend = backend

    @torch.no_grad()
    def update(self) -> None:
        from twinflow.kernels.ema import ema_update_, ema_update_reference_

        decay = self.schedule.next_decay()
        sources = [p.detach() for p in self.online]
        if self.backend == "eager":
            ema_update_reference_(self.ema, sources, decay, shadow_list=self.shadow)
        else:
            ema_update_(self.ema, sources, decay, shadow=self.shadow, backend=self.backend)


class ReferenceOrderObjective(TwinFlowObjective):
    """The objective with the reference's unbatched teacher and rectification passes (same rows, same
    random draws, same values as :class:`TwinFlowObjective`)."""

    @torch.no_grad()
    def _guidance(self, teacher_model, x_t, t, cond, uncond, rows, target, dtype):
        v_c = torch.zeros_like(target)
        v_u = torch.zeros_like(target)
        idx = rows.nonzero().squeeze(1)
        if idx.numel() == 0:
            return v_c, v_u
        xs, ts = x_t[idx].to(dtype), t[idx]
        v_c[idx] = teacher_model(xs, ts, ts, index_condition(cond, idx)).float()
        v_u[idx] = teacher_model(xs, ts, ts, index_condition(uncond, idx)).float()
        return v_c, v_u

    @torch.no_grad()
    def _rectification(self, model, x_e, cond_e) -> torch.Tensor:
        n = x_e.shape[0]
        z = torch.randn_like(x_e)
        sigma = torch.rand(n, device=x_e.device)
        sg = sigma.to(x_e.dtype).view(-1, *([1] * (x_e.dim() - 1)))
        x_s = sg * z + (1 - sg) * x_e
        v_fake = model(x_s, -sigma, -sigma, cond_e)
        v_real = model(x_s, sigma, sigma, cond_e)
        return v_fake.float() - v_real.float()


_VARIANT_SETTINGS = {
    # transformer kernels, attention backend, loss kernels, EMA backend, objective class
    "baseline": ("eager", "native", "eager", "eager", ReferenceOrderObjective),
    "ours": ("triton", "auto", "auto", "auto", TwinFlowObjective),
}


class AttentionPathLog:
    """Which attention path (``twinflow.backbones.qwen_image.attention.ATTENTION_PATHS``) each forward
    ran: hooks around the backbones' forwards take the difference of the attention module's per-path call
    counters (Python integers: no device sync, no tensor). ``forwards`` lists, in call order since the last
    :meth:`clear`, ``{"model", "rows", "paths"}`` per forward; a step's passes run in the objective's order
    (adv fakes, main, guidance, RCGM, rectification), and the guidance pass (cond + uncond rows, padded
    text) is the one that exercises the packed paths."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        self.forwards: list[dict] = []
        self._open: list[dict[str, int]] = []
        for name, model in models.items():
            model.register_forward_pre_hook(self._enter)
            model.register_forward_hook(lambda module, args, output, name=name: self._exit(name, args))

    def clear(self) -> None:
        self.forwards = []

    def _enter(self, module, args) -> None:
        from twinflow.backbones.qwen_image.attention import attention_path_calls

        self._open.append(attention_path_calls())

    def _exit(self, name: str, args) -> None:
        from twinflow.backbones.qwen_image.attention import attention_path_calls

        before, after = self._open.pop(), attention_path_calls()
        paths = {path: after[path] - before[path] for path in after if after[path] != before[path]}
        self.forwards.append({"model": name, "rows": int(args[0].shape[0]), "paths": paths})

    def totals(self) -> dict[str, int]:
        """Attention calls per path over the logged forwards."""
        total: dict[str, int] = {}
        for entry in self.forwards:
            for path, calls in entry["paths"].items():
                total[path] = total.get(path, 0) + calls
        return total


def attention_backend_of(model: torch.nn.Module) -> str:
    for module in model.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            return backend.value
    return "unknown"


class StepRunner:
    """One variant's model, teacher, optimizer and a fixed batch; :meth:`step` is one training step."""

    def __init__(self, variant: str, size: E2ESize, device: torch.device, seed: int = 0):
        from twinflow.backbones.qwen_image.build import build_qwen_image_backbone
        from twinflow.backbones.qwen_image.config import QwenImageBackboneConfig

        kernels, attention, loss_kernels, ema_backend, objective_cls = _VARIANT_SETTINGS[variant]
        self.variant, self.size, self.device = variant, size, device
        config = QwenImageBackboneConfig(transformer=dict(size.transformer), dtype=size.dtype, kernels=kernels,
                                         attention_backend=attention)
        torch.manual_seed(seed)  # identical initial weights in both variants
        self.model = build_qwen_image_backbone(config, device).train()
        self.attention_backend = attention_backend_of(self.model)
        method = TwinFlowConfig(kernels=loss_kernels)
        self.objective = objective_cls(method)
        self.teacher = ShadowEMATeacher(self.model, method.ema_decay_rate, ema_backend)
        self.attention_paths = AttentionPathLog({"online": self.model, "teacher": self.teacher.model})
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6, weight_decay=0.0,
                                           fused=fused or None, foreach=None if fused else True)
        self.x, self.cond, self.uncond = make_batch(size, device, seed)
        self._step_seed = seed
        self.last_forward_rows: dict[str, int] = {}

    def step(self) -> torch.Tensor:
        """One optimizer step; the random draws depend only on the step count, not on the variant."""
        self._step_seed += 1
        torch.manual_seed(self._step_seed)
        self.attention_paths.clear()
        out = self.objective.training_step(self.model, self.x, self.cond, self.uncond, self.teacher)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.update()
        self.last_forward_rows = out.forward_rows
        return out.loss.detach()


def make_batch(size: E2ESize, device: torch.device, seed: int) -> tuple[torch.Tensor, QwenCondition, QwenCondition]:
    """Random float32 latents (as the trainer's data gives them) and unpadded prompt / negative-prompt
    embeddings of the configured lengths."""
    g = torch.Generator().manual_seed(seed)
    b, text_dim = size.batch, size.transformer["joint_attention_dim"]
    x = torch.randn((b, *size.latent), generator=g).to(device)

    def condition(tokens: int) -> QwenCondition:
        embeds = torch.randn(b, tokens, text_dim, generator=g).to(device)
        return QwenCondition(embeds, torch.ones(b, tokens, dtype=torch.bool, device=device))

    return x, condition(size.cond_tokens), condition(size.uncond_tokens)


def summarize(runner: StepRunner, seconds_per_step: float, peak_bytes: Optional[int],
              peak_tflops: Optional[float]) -> dict:
    """The measured numbers of one variant: throughput, peak memory and FLOP utilisation."""
    flops = step_flops(runner.size, runner.last_forward_rows)
    record = {
        "images_per_s": runner.size.batch / seconds_per_step,
        "seconds_per_step": seconds_per_step,
        "peak_memory_bytes": peak_bytes,
        "attention_backend": runner.attention_backend,
        "attention_paths_per_step": runner.attention_paths.totals(),
        "attention_paths_per_forward": list(runner.attention_paths.forwards),
        "forward_rows": dict(runner.last_forward_rows),
        "main_pass_tflop_per_step": flops["main_pass_flop"] / 1e12,
        "model_tflop_per_step": flops["step_flop"] / 1e12,
        "peak_bf16_tflops": peak_tflops,
        "main_pass_mfu": None,
        "all_pass_mfu": None,
    }
    if peak_tflops:
        record["main_pass_mfu"] = flops["main_pass_flop"] / seconds_per_step / (peak_tflops * 1e12)
        record["all_pass_mfu"] = flops["step_flop"] / seconds_per_step / (peak_tflops * 1e12)
    return record


def _run_variant(variant: str, size: E2ESize, device: torch.device, timer, warmup: bool) -> Optional[dict]:
    runner = StepRunner(variant, size, device)
    for _ in range(size.warmup_steps if warmup else 0):
        runner.step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = timer(runner.step, TimingPlan(rounds=size.steps if warmup else 1, iterations=1, warmup=0))
    if timing is None:
        return None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    peak_tflops = peak_bf16_tflops(device_name(device)) if device.type == "cuda" else None
    return {"timing": timing, "summary": summarize(runner, timing.median_s, peak, peak_tflops)}


def measure_step(variant: str, size: E2ESize, device: torch.device,
                 timer: Callable[[Callable[[], object], TimingPlan], Optional[Timing]],
                 warmup: bool = True) -> Optional[dict]:
    """Builds one variant, runs ``size.warmup_steps`` untimed steps, times ``size.steps`` steps with
    ``timer`` (one step per round) and frees everything before returning (the two variants run one
    after the other, each with the whole device). Peak memory covers the timed steps and everything
    resident during them (weights, gradients, optimizer state, EMA, shadow)."""
    try:
        return _run_variant(variant, size, device, timer, warmup)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
