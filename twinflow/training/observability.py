"""What a run shows while it trains: a progress bar, TensorBoard scalars, a JSON-lines metrics log and
sample grids.

Why each piece:

* The **progress bar** (rank 0, tqdm) is for the person watching: step, both loss parts (base and
  rectification), gradient norm, learning rate, throughput, memory and skipped steps at a glance.
* The **resolved config** (rank 0, at start): every key, defaults included, printed, written to
  ``resolved_config.yaml`` and logged as TensorBoard text, so what a run trained with is never implicit.
* **TensorBoard** (rank 0) for curves; the **JSON-lines log** ``metrics.jsonl`` for scripts and tests
  (one object per logged step, plain numbers, appended so a resumed run continues the same file).
* **Skip counters**: optimizer steps skipped for a non-finite loss or gradient norm (the trainer's
  ``skipped_steps`` scalar) and data items skipped as unusable (:class:`twinflow.data.DataStats`), so a
  run that silently trains on half its data, or keeps skipping steps, is visible.
* **Sample grids**: every ``train.sample_every`` steps the teacher weights (the EMA) sample each prompt
  with each configured sampler preset (ALGORITHM.md §4: 1- and 2-NFE few-step, 4-NFE any-step, 30-NFE
  multi-step) from the same seeded noise, and one PNG per preset is written with the prompts as
  captions, so progress at every step budget can be compared across steps. Latents are decoded with
  the VAE when one is available, otherwise shown as a false-colour latent visualisation.

Memory: CUDA's peak allocated bytes when training on a GPU, the process's resident set size on CPU.

Distributed runs: every method may be called on every rank. Only rank 0 writes; sampling runs on all
ranks because ZeRO-3 forwards are collective (each rank gathers parameters with the others).
"""
from __future__ import annotations

import json
import math
import os
import resource
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from twinflow.sampling import SamplerConfig, sample
from twinflow.training.distributed import all_ranks_agree
from twinflow.utils.atomic_files import atomic_write_text

if TYPE_CHECKING:
    from twinflow.data.stats import DataStats
    from twinflow.method.teachers import Teacher

    from .config import SamplingSection, TrainConfig

Backbone = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]

CELL = 256
"""Pixel size of one image in a grid (images are resized to it; latents upscaled without smoothing)."""
CAPTION_HEIGHT = 48
TITLE_HEIGHT = 24
MAX_COLUMNS = 4


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def memory_reading() -> tuple[str, float]:
    """``(name, GiB)``: CUDA's peak allocated memory on a GPU, else this process's resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "memory/cuda_max_allocated_gib", torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return "memory/rss_gib", pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:  # no procfs (macOS): the peak RSS, which getrusage reports in bytes there
        return "memory/max_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**30


# --------------------------------------------------------------------------------------------------
# Sample grids
# --------------------------------------------------------------------------------------------------


def latent_visualisation(latents: torch.Tensor) -> torch.Tensor:
    """False-colour images (B, 3, h, w) in [-1, 1] from latents (B, C, h, w): the first three
    channels (repeated when fewer), each image stretched to its own value range."""
    if latents.dim() != 4:
        raise ValueError(f"latents must be (B, C, h, w), got shape {tuple(latents.shape)}")
    x = latents.float()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in arr]


def compose_grid(images: Sequence[Image.Image], captions: Sequence[str], title: str) -> Image.Image:
    """Images in rows of up to :data:`MAX_COLUMNS`, each resized to :data:`CELL` pixels with its
    caption (wrapped, truncated to the caption strip) underneath, under a one-line title."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    cols = min(MAX_COLUMNS, max(1, len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * CELL, TITLE_HEIGHT + rows * (CELL + CAPTION_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.text((4, 4), title, fill="black", font=font)
    chars_per_line = CELL // 6
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = (i % cols) * CELL
        y = TITLE_HEIGHT + (i // cols) * (CELL + CAPTION_HEIGHT)
        resample = Image.NEAREST if image.width < CELL else Image.BICUBIC
        grid.paste(image.resize((CELL, CELL), resample), (x, y))
        lines = textwrap.wrap(caption, chars_per_line)[:3] or [""]
        draw.multiline_text((x + 3, y + CELL + 2), "\n".join(lines), fill="black", font=font, spacing=2)
    return grid


@dataclass
class SamplePrompts:
    """What sample grids are made of: the prompts' conditions (batch first, on the CPU), their captions,
    the shape (C, h, w) of one latent, and the decoder (None: latent visualisation)."""

    conditions: Any
    captions: list[str]
    latent_shape: tuple[int, int, int]
    decode: Decoder | None = None


def write_sample_grids(
    folder: str | Path,
    stem: str,
    backbone: Backbone,
    prompts: SamplePrompts,
    presets: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    title: str = "",
    write: bool = True,
) -> dict[str, Path]:
    """Sample every prompt with each sampler preset and write ``<folder>/<stem>_<preset>.png``.

    Every preset starts from the same seeded noise, so grids differ only by the sampler and the
    weights. ``write=False`` samples without decoding or writing (the non-zero ranks of a ZeRO-3 run,
    whose forwards must still take part). The PNG's text chunk ``twinflow`` holds the preset, NFE and
    captions as JSON. Returns the written files by preset name (none when not writing).
    """
    device = torch.device(device)
    count = len(prompts.captions)
    if count == 0:
        raise ValueError("no prompts to sample")
    conditions = prompts.conditions
    if conditions is not None:
        conditions = conditions.to(device)
    folder = Path(folder)
    results = []
    for name in presets:  # every forward first: a failed write must not skip collectives (ZeRO-3)
        config = SamplerConfig.preset(name)
        generator = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn((count, *prompts.latent_shape), generator=generator, device=device)
        results.append(sample(backbone, noise, conditions, config=config, generator=generator, keep_intermediates=False))
    written: dict[str, Path] = {}
    for name, result in zip(presets, results):
        if not write:
            break
        latents = result.sample.float()
        images = prompts.decode(latents) if prompts.decode is not None else latent_visualisation(latents)
        heading = f"{title}  |  " if title else ""
        grid = compose_grid(_to_pil(images), prompts.captions, f"{heading}{name}: {result.nfe} NFE")
        info = PngInfo()
        info.add_text("twinflow", json.dumps({"preset": name, "nfe": result.nfe, "captions": prompts.captions}))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}_{name}.png"
        grid.save(path, pnginfo=info)
        written[name] = path
    return written


# --------------------------------------------------------------------------------------------------
# Where the sample prompts come from
# --------------------------------------------------------------------------------------------------


def synthetic_sample_prompts(config: TrainConfig) -> SamplePrompts:
    """Synthetic-data runs have no text encoder: the first synthetic items' conditions stand in for
    the prompts (one per configured prompt), captioned with their item index."""
    from .data import SyntheticDataset

    synthetic = config.synthetic_data
    dataset = SyntheticDataset(synthetic, config.model.family)
    count = min(len(config.sampling.prompts), len(dataset))
    batch = dataset.collate([dataset[i] for i in range(count)])
    return SamplePrompts(
        conditions=batch.cond,
        captions=[f"synthetic item {i}" for i in range(count)],
        latent_shape=(synthetic.latent_channels, synthetic.latent_size, synthetic.latent_size),
    )


def encoded_sample_prompts(cache_dir: str | Path, sampling: SamplingSection, *, decode: bool,
                           family: str | None = None) -> SamplePrompts:
    """Encode ``sampling.prompts`` on the CPU with the text encoder the cache in ``cache_dir`` was built
    with (its manifest names the model folder and the encoding settings; ``family`` is the backbone's).
    The text encoder is released right after; only the latent decoder is kept, and only when ``decode``
    (the rank that writes)."""
    from twinflow.backbones.registry import backbone_spec
    from twinflow.data.cache import read_manifest
    from twinflow.data.latent_codec import LatentCodec

    fingerprint = read_manifest(cache_dir)["fingerprint"]
    codec = LatentCodec.from_fingerprint(fingerprint)
    conditioner = backbone_spec(family).conditioner_from_fingerprint(fingerprint)
    prompts = list(sampling.prompts)
    conditions = conditioner.encode_prompts(prompts)
    conditioner.drop_text_encoder()  # frees the text encoder's host memory; from here on only the VAE is used
    shape = codec.latent_shape(sampling.height, sampling.width, conditioner)
    return SamplePrompts(conditions, prompts, shape, codec.decoder(conditioner) if decode else None)


def _broadcast_from_rank0(prompts: SamplePrompts | None) -> SamplePrompts:
    """Rank 0's prompts (without the decoder) on every rank, so all ranks sample identical inputs."""
    import torch.distributed as dist

    payload = [None if prompts is None else (prompts.conditions, prompts.captions, prompts.latent_shape)]
    dist.broadcast_object_list(payload, src=0)
    conditions, captions, shape = payload[0]
    return SamplePrompts(conditions, captions, shape)


# --------------------------------------------------------------------------------------------------
# The run logger
# --------------------------------------------------------------------------------------------------

_BAR_FIELDS = (
    ("loss/base", "base", "{:.4g}"),
    ("loss/rect", "rect", "{:.4g}"),
    ("grad_norm", "gnorm", "{:.3g}"),
    ("lr", "lr", "{:.2e}"),
    ("samples_per_second", "samp/s", "{:.2f}"),
)


def _device_of(backbone: Any) -> torch.device:
    """Where a backbone computes: a DeepSpeed engine's ``device``, else its first parameter's."""
    device = getattr(backbone, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    if isinstance(backbone, torch.nn.Module):
        for p in backbone.parameters():
            return p.device
    return torch.device("cpu")


class RunLogger:
    """The trainer's run logger (the ``RunLogger`` protocol of :mod:`.trainer`).

    ``RunLogger(config, rank)`` on every rank; only rank 0 creates files: ``<train.output_dir>/
    tensorboard/``, ``metrics.jsonl`` and ``samples/``. ``data_stats`` (the loader's
    :class:`~twinflow.data.DataStats`) adds skipped-item counts to every logged step. Sample prompts come
    from the synthetic data or the cache's text encoder (:func:`synthetic_sample_prompts`,
    :func:`encoded_sample_prompts`), prepared at the first sampling step.
    """

    def __init__(
        self,
        config: TrainConfig,
        rank: int,
        *,
        data_stats: DataStats | None = None,
        progress: bool = True,
    ):
        self.config = config
        self.rank = rank
        self.data_stats = data_stats
        self.output_dir = Path(config.train.output_dir)
        self._prompts: SamplePrompts | None = None
        self._writer = None
        self._metrics = None
        self._bar = None
        with all_ranks_agree(f"creating the run logs in {self.output_dir}"):
            if rank == 0:
                from torch.utils.tensorboard import SummaryWriter

                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
                self._metrics = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
                self._record_config()
                if progress:
                    from tqdm.auto import tqdm

                    self._bar = tqdm(total=config.train.max_steps, desc="train", unit="step", dynamic_ncols=True)

    def _record_config(self) -> None:
        """Rank 0, at start: the fully resolved config (every key, defaults included) printed, written to
        ``resolved_config.yaml`` (replaced at each start: a resumed run may have other overrides; each
        checkpoint's ``meta.json`` keeps the config that wrote it) and logged as TensorBoard text."""
        from .config import RESOLVED_CONFIG, resolved_yaml

        text = resolved_yaml(self.config)
        path = self.output_dir / RESOLVED_CONFIG
        atomic_write_text(path, text)
        print(f"twinflow train: resolved config (written to {path}):\n{text}", end="", flush=True)
        # Indented four spaces: TensorBoard renders text as Markdown, where that is a code block.
        self._writer.add_text("config", textwrap.indent(text, "    "), 0)

    # ------------------------------------------------------------------------------------ scalars
    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record one optimizer step's (rank-averaged) scalars: the progress bar every step, TensorBoard
        and ``metrics.jsonl`` every ``train.log_every`` steps. Rank 0 writes; every rank calls it, and all
        agree that the write succeeded (one tiny all-reduce)."""
        with all_ranks_agree(f"writing the step-{step} logs"):
            if self.rank == 0:
                self._write_step(step, scalars)

    def _write_step(self, step: int, scalars: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in scalars.items()}
        mem_name, mem_gib = memory_reading()
        values[mem_name] = mem_gib
        if self.data_stats is not None:
            values["data/skipped_items"] = float(self.data_stats.total)
            values.update({f"data/skipped/{reason}": float(n) for reason, n in self.data_stats.as_dict().items()})
        if self._bar is not None:
            self._update_bar(step, values, mem_gib)
        if step % self.config.train.log_every:
            return
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        record = {"step": step, "time": time.time(), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def _update_bar(self, step: int, values: Mapping[str, float], mem_gib: float) -> None:
        parts = [f"{label} {fmt.format(values[key])}" for key, label, fmt in _BAR_FIELDS if key in values]
        parts.append(f"mem {mem_gib:.1f}G")
        if values.get("skipped_steps"):
            parts.append(f"skipped {int(values['skipped_steps'])}")
        if values.get("data/skipped_items"):
            parts.append(f"bad items {int(values['data/skipped_items'])}")
        self._bar.n = step
        self._bar.set_postfix_str(", ".join(parts), refresh=True)

    # ------------------------------------------------------------------------------------ samples
    def maybe_sample(self, step: int, backbone: Any, teacher: Teacher) -> None:
        """Every ``train.sample_every`` steps: sample with the teacher's weights (the EMA) and write one
        grid per ``sampling.presets`` entry. Collective: call it on every rank."""
        every = self.config.train.sample_every
        if not every or step % every:
            return
        prompts = self._sample_prompts()
        # Rank 0 decodes and writes after the last collective forward; all ranks agree it succeeded.
        with all_ranks_agree(f"writing the step-{step} sample grids"), teacher.session() as model:
            written = write_sample_grids(
                self.output_dir / "samples", f"step{step:07d}", model, prompts, self.config.sampling.presets,
                device=_device_of(backbone), seed=self.config.sampling.seed, title=f"step {step}",
                write=self.rank == 0,
            )
            for name, path in written.items():
                with Image.open(path) as grid:
                    self._writer.add_image(f"samples/{name}", np.asarray(grid.convert("RGB")), step, dataformats="HWC")

    def _sample_prompts(self) -> SamplePrompts:
        if self._prompts is None:
            if self.config.synthetic_data is not None:
                self._prompts = synthetic_sample_prompts(self.config)
            else:
                import torch.distributed as dist

                distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                mine = None
                with all_ranks_agree("encoding the sample prompts on rank 0"):
                    if self.rank == 0:
                        mine = encoded_sample_prompts(self.config.data.cache_dir, self.config.sampling, decode=True,
                                                      family=self.config.model.family)
                if distributed:
                    shared = _broadcast_from_rank0(mine)
                    self._prompts = mine if self.rank == 0 else shared
                else:
                    self._prompts = mine
        return self._prompts

    # ------------------------------------------------------------------------------------ end
    def close(self) -> None:
        """Flush and close the files and the progress bar (safe to call twice)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
