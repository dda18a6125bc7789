"""Crash-safe, resumable checkpoints of a ZeRO-3 run, stored as safetensors + JSON (nothing pickled).

Why not DeepSpeed's ``save_checkpoint``/``load_checkpoint``: DeepSpeed 0.19 reads its partition files
with its torch checkpoint engine, which turns ``weights_only`` off, i.e. it unpickles
whatever the files contain, and a checkpoint must never be able to run code. So each rank writes its
own partitions with safetensors: the float32 master partition and the optimizer state of every
sub-group (``master.<i>``, ``optim.<i>.<key>``), the teacher's shards (``teacher.*``) and its RNG states
(``rng.*``); plain values (optimizer state kept as Python numbers, such as DeepSpeed's Adam ``step``,
data position, Python RNG, EMA schedule, counters, LR schedule, the config) go to JSON.

Layout under ``<output_dir>/checkpoints`` (every file and key name is spelled once, in the "layout"
section below; the trainer and export ask it)::

    step_00000300/            a complete checkpoint
        rank-00000.safetensors, rank-00000.json, ...   one pair per rank
        meta.json             written last: step, world size, counters, schedule, byte size of every file
    latest                    the name of the newest complete checkpoint (replaced atomically)

Atomic protocol (:meth:`CheckpointStore.save`): every rank writes and fsyncs its files into
``.tmp-step_XXXXXXXX``; once all ranks agree they did, rank 0 writes ``meta.json``, fsyncs the folder,
renames it to ``step_XXXXXXXX`` and fsyncs the parent, then replaces ``latest`` (temp file, fsync, ``os.replace``), and
only then prunes checkpoints beyond ``keep_last`` (renamed away first, then deleted, so a crash while
pruning never leaves a partial checkpoint that looks complete). A crash at any point leaves the
previous checkpoint and ``latest`` intact; the leftovers of an interrupted save or prune (``.tmp-*``,
``.trash-*``) are removed at the next start and by the next save (:func:`sweep_leftovers`). An error in
any step on any rank fails every rank with its message (see
:class:`~twinflow.training.distributed.all_ranks_agree`). Multi-node runs need ``output_dir`` on a shared
file system.

Nothing non-finite is committed: before a save writes anything, every rank checks its tensors (master
weights, optimizer state, EMA) and one all-reduce agrees on the answer; if any rank holds a NaN or
inf, every rank refuses the save with :class:`CheckpointError` naming the first bad tensor and its
rank, so ``latest`` keeps naming the last good checkpoint (:func:`refuse_nonfinite`).

Loading checks the format, that the world size matches (partitions are per rank), and that every
file has the byte size ``meta.json`` recorded, so a truncated file is an error naming it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from twinflow.utils.atomic_files import atomic_write_text, fsync_path, write_json_durable

from .distributed import all_ranks_agree, any_rank, collective_device

FORMAT = "twinflow-zero3-checkpoint"
VERSION = 1
LEFTOVER_PREFIXES = (".tmp-", ".trash-")
"""Folders of an interrupted save (``.tmp-step_N``) or prune (``.trash-step_N``)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names the file."""


# ---------------------------------------------------------------------------------------------- layout
CHECKPOINTS_DIR = "checkpoints"
"""The store's folder under ``train.output_dir``."""
META = "meta.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
TEACHER = "teacher"
"""Prefix of the teacher's tensors: :func:`split_tensors` of its ``state_dict()`` under this name."""
RNG_CPU, RNG_CUDA = "rng.torch_cpu", "rng.torch_cuda"
META_LAYOUT = "layout"
"""``meta.json`` key of what export needs to reassemble parameters (``export.export_layout``)."""
META_CONFIG = "config"
"""``meta.json`` key of the run's resolved config (``to_dict`` of its ``TrainConfig``)."""
META_TRAIN_STATE, META_SCHEDULER = "train_state", "scheduler"
"""``meta.json`` keys of the trainer's counters and its learning-rate schedule."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_files(rank: int) -> tuple[str, str]:
    """A rank's two files in a checkpoint folder: its tensors (safetensors) and its plain data (JSON)."""
    stem = f"rank-{rank:05d}"
    return f"{stem}.safetensors", f"{stem}.json"


def master_key(group: int) -> str:
    """This rank's float32 master partition of ZeRO-3 sub-group ``group``."""
    return f"master.{group}"


def optim_key(group: int, key: str) -> str:
    """A tensor of sub-group ``group``'s optimizer state (e.g. Adam's ``exp_avg``)."""
    return f"optim.{group}.{key}"


def ema_shard_key(group: int) -> str:
    """This rank's EMA shard of sub-group ``group`` (full-model runs with an EMA teacher): where
    :func:`split_tensors` puts ``state_dict()["tensors"]["ema.<group>"]`` of the shard EMA teacher
    (:mod:`twinflow.method.teachers.zero3`) under :data:`TEACHER`."""
    return f"{TEACHER}.tensors.ema.{group}"


def ema_adapter_key(index: int) -> str:
    """This rank's partition of the ``index``-th parameter of the LoRA ``ema`` adapter: the teacher's
    ``state_dict()["ema_adapter"][index]`` (:mod:`.teachers`) under :data:`TEACHER`."""
    return f"{TEACHER}.ema_adapter.{index}"


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a complete checkpoint folder (``meta.json`` is written last)."""
    return (Path(path) / META).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` of a complete checkpoint of this format; :class:`CheckpointError` otherwise."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} v{VERSION} checkpoint")
    return meta


def load_rank_tensors(path: str | Path, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tensors of the checkpoint at ``path``, on the CPU."""
    return load_file(str(Path(path) / rank_files(rank)[0]), device="cpu")


# ------------------------------------------------------------------------------------- tensor <-> JSON
def split_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}``, collecting it in ``out``."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, f"{prefix}.{k}", out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint tensor {key!r} is missing")
            return tensors[key]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------- RNG states
def capture_rng(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's torch CPU (and CUDA) generator states as tensors, Python's as JSON data."""
    tensors = {RNG_CPU: torch.get_rng_state()}
    if device.type == "cuda":
        tensors[RNG_CUDA] = torch.cuda.get_rng_state(device)
    version, state, gauss = random.getstate()
    return tensors, {"python": [version, list(state), gauss]}


def restore_rng(tensors: dict[str, torch.Tensor], data: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors[RNG_CPU])
    if device.type == "cuda":
        if RNG_CUDA not in tensors:
            raise CheckpointError("checkpoint has no CUDA RNG state (it was written by a CPU run)")
        torch.cuda.set_rng_state(tensors[RNG_CUDA], device)
    version, state, gauss = data["python"]
    random.setstate((version, tuple(state), gauss))


# ------------------------------------------------------------------------------- ZeRO-3 optimizer state
def split_optimizer_state(state: dict[str, Any], group: int, tensors: dict[str, torch.Tensor],
                          plain: dict[str, Any]) -> None:
    """Put sub-group ``group``'s optimizer ``state`` into ``tensors`` (``optim.<group>.<key>``, for
    safetensors) and ``plain`` (``<group>.<key>``, for JSON). Plain numbers are what DeepSpeed's own Adams
    keep as Python values: FusedAdam and DeepSpeedCPUAdam hold ``step`` as an int, torch's AdamW as a
    tensor. Both round-trip exactly (JSON keeps int and float, and writes floats exactly)."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[optim_key(group, key)] = value
        elif isinstance(value, (bool, int, float)):
            plain[f"{group}.{key}"] = value
        else:
            raise CheckpointError(f"optimizer state {key!r} of sub-group {group} is a {type(value).__name__}: "
                                  "only tensors, ints and floats can be saved")


def restore_optimizer_state(state: dict[str, Any], group: int, tensors: dict[str, torch.Tensor],
                            plain: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`split_optimizer_state`. Optimizers create their state lazily at the first step:
    an empty ``state`` adopts the saved values (tensors on ``device``, 0-dim ones such as torch's ``step``
    on the CPU, as torch keeps them); a live one must have the same keys and kinds of values."""
    prefix = optim_key(group, "")
    saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    saved.update({k.split(".", 1)[1]: v for k, v in plain.items() if k.startswith(f"{group}.")})
    if state and set(saved) != set(state):
        raise CheckpointError(f"checkpoint optimizer state of sub-group {group} has {sorted(saved)}, expected {sorted(state)}")
    for key, value in saved.items():
        live = state.get(key)
        if isinstance(value, torch.Tensor) and isinstance(live, torch.Tensor):
            live.copy_(value)
        elif isinstance(value, torch.Tensor) and live is None:
            state[key] = value.clone() if value.dim() == 0 else value.to(device, copy=True)
        elif not isinstance(value, torch.Tensor) and not isinstance(live, torch.Tensor):
            state[key] = value
        else:
            raise CheckpointError(
                f"checkpoint optimizer state {key!r} of sub-group {group} is {type(value).__name__}, this run's "
                f"optimizer keeps {type(live).__name__}: it was written with another optimizer "
                "(deepspeed.offload_optimizer or the device differs)"
            )


def zero3_partition_state(optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's float32 master partitions (``master.<i>``) and optimizer state per sub-group:
    ``(tensors, plain)``, see :func:`split_optimizer_state`."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
        tensors[master_key(i)] = flat
        split_optimizer_state(optimizer.optimizer.state.get(flat, {}), i, tensors, plain)
    return tensors, plain


@torch.no_grad()
def load_zero3_partition_state(optimizer: Any, tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Copy a rank's saved partitions and optimizer state (``tensors`` and ``plain`` of
    :func:`zero3_partition_state`) back and refresh the low-precision partitions from the masters (what
    DeepSpeed's own loader does), then drop every gathered copy so nothing stale is used."""
    flats = optimizer.fp32_partitioned_groups_flat
    for i, flat in enumerate(flats):
        key = master_key(i)
        if key not in tensors:
            raise CheckpointError(f"checkpoint has no {key}: it was written with another model or layout")
        if tensors[key].shape != flat.shape:
            raise CheckpointError(
                f"checkpoint {key} has shape {tuple(tensors[key].shape)}, this rank's partition {tuple(flat.shape)}: "
                "the model or the number of ranks differs"
            )
        flat.copy_(tensors[key])
        restore_optimizer_state(optimizer.optimizer.state[flat], i, tensors, plain, flat.device)
        optimizer._reassign_or_swap_out_partitioned_parameters(i)
    optimizer.empty_partition_cache()


# ---------------------------------------------------------------------------------- a trainer rank's part
def rank_state(optimizer: Any, teacher: Any, loader: Any, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's part of a trainer checkpoint, ``(tensors, plain data)`` for :meth:`CheckpointStore.save`:
    the ZeRO-3 partitions and optimizer state, the teacher's ``state_dict()`` (its tensors under
    :data:`TEACHER`), the RNG states and the data loader's position."""
    tensors, optim_plain = zero3_partition_state(optimizer)
    teacher_data = split_tensors(teacher.state_dict(), TEACHER, tensors)
    rng_tensors, rng_data = capture_rng(device)
    tensors.update(rng_tensors)
    return tensors, {"teacher": teacher_data, "data": loader.state_dict(), "rng": rng_data, "optim": optim_plain}


def restore_rank_state(optimizer: Any, teacher: Any, loader: Any, tensors: dict[str, torch.Tensor],
                       rank_data: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`rank_state`, the RNG states last."""
    load_zero3_partition_state(optimizer, tensors, rank_data.get("optim", {}))
    teacher.load_state_dict(join_tensors(rank_data["teacher"], tensors))
    loader.load_state_dict(rank_data["data"])
    restore_rng(tensors, rank_data["rng"], device)


# ------------------------------------------------------------------------------- what may be committed
NONFINITE_CHECK_SLICE = 1 << 26
"""Elements checked at a time: ``isfinite`` makes a bool copy, 64 MiB per slice instead of one as large
as a master sub-group (DeepSpeed's default ``sub_group_size`` is 1e9 elements)."""


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor (in key order) holding a NaN or inf, else None."""
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() and t.numel():
            flat = t.detach().reshape(-1)
            if not all(bool(torch.isfinite(part).all()) for part in flat.split(NONFINITE_CHECK_SLICE)):
                return key
    return None


def refuse_nonfinite(tensors: dict[str, torch.Tensor], step: int) -> None:
    """Collective: :class:`CheckpointError` on every rank if any rank's ``tensors`` hold a NaN or inf.

    One all-reduce of a flag agrees on the answer; only when it is yes are the ranks' findings gathered,
    so every rank's error (and the one line rank 0 prints) names the tensor and the rank holding it."""
    import torch.distributed as dist

    try:
        name = first_nonfinite(tensors)
        bad = None if name is None else f"tensor {name!r} on rank {{rank}} holds NaN or inf"
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: still join the agreement below
        bad = f"checking the tensors on rank {{rank}} failed ({type(e).__name__}: {' '.join(str(e).split())})"
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not any_rank(bad is not None, collective_device()):
        return
    found = [bad]
    if distributed:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
    rank, finding = next((r, n) for r, n in enumerate(found) if n is not None)
    raise CheckpointError(f"checkpoint of step {step} refused: {finding.format(rank=rank)}; "
                          "nothing was written and 'latest' is unchanged")


def sweep_leftovers(root: Path) -> list[str]:
    """Delete what interrupted saves and prunes left under ``root`` (see :data:`LEFTOVER_PREFIXES`)."""
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(LEFTOVER_PREFIXES) and path.is_dir():
            shutil.rmtree(path)
            removed.append(path.name)
    return removed


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders under ``root`` (those with ``meta.json``), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names under ``root``; without a pointer, the newest complete one (a
    crash can fall between the rename and the pointer update); None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if not is_complete(path):
            raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
        return path
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


# ----------------------------------------------------------------------------------------------- store
class CheckpointStore:
    """Writes and finds checkpoints under ``root`` with the atomic protocol of the module docstring.

    Test hooks, called with the step: ``fault_after_rank_files`` after this rank's files are written (it
    may exit the process to simulate a crash in the middle of a save); ``fault_in_commit`` on rank 0 at
    the start of the commit (it may raise, as a full disk would); ``fault_in_prune`` on rank 0 after a
    pruned checkpoint was moved to the trash and before it is deleted.
    """

    def __init__(self, root: str | Path, rank: int, world_size: int, keep_last: int,
                 fault_after_rank_files: Optional[Callable[[int], None]] = None,
                 fault_in_commit: Optional[Callable[[int], None]] = None,
                 fault_in_prune: Optional[Callable[[int], None]] = None):
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self._fault = fault_after_rank_files
        self._commit_fault = fault_in_commit
        self._prune_fault = fault_in_prune

    def sweep_leftovers(self) -> list[str]:
        """Rank 0: delete the leftovers of interrupted saves and prunes (run at start and by every save)."""
        return sweep_leftovers(self.root) if self.rank == 0 else []

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders (those with ``meta.json``), oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Optional[Path]:
        """See :func:`latest_checkpoint`."""
        return latest_checkpoint(self.root)

    def save(self, step: int, tensors: dict[str, torch.Tensor], rank_data: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own ``tensors``/``rank_data``; ``meta`` is used on rank 0."""
        refuse_nonfinite(tensors, step)
        name = step_dir_name(step)
        tmp = self.root / f".tmp-{name}"
        # Each section ends with the ranks agreeing on success: a failure on any rank (a full disk, a
        # failed rename) fails them all with its message; none is left waiting for the others.
        with all_ranks_agree(f"checkpoint save: preparing {tmp}"):
            if self.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                self.sweep_leftovers()
                tmp.mkdir()
        with all_ranks_agree(f"checkpoint save: writing the rank files into {tmp}"):
            tensor_file, data_file = rank_files(self.rank)
            cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
            save_file(cpu, str(tmp / tensor_file))
            fsync_path(tmp / tensor_file)
            write_json_durable(tmp / data_file, rank_data)
            if self._fault is not None:
                self._fault(step)
        final = self.root / name
        with all_ranks_agree(f"checkpoint commit of {final}"):
            if self.rank == 0:
                self._commit(step, tmp, final, meta)
        return final

    def _commit(self, step: int, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        """Rank 0: ``meta.json`` last into the complete folder, the rename, ``latest``, then pruning."""
        if self._commit_fault is not None:
            self._commit_fault(step)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        expected = {name for r in range(self.world_size) for name in rank_files(r)}
        if set(files) != expected:
            raise CheckpointError(f"checkpoint {tmp} holds {sorted(files)}, expected {sorted(expected)}")
        write_json_durable(tmp / META, {**meta, "format": FORMAT, "version": VERSION, "step": step,
                                 "world_size": self.world_size, "files": files})
        fsync_path(tmp)
        if final.exists():
            self._discard(final)
        os.rename(tmp, final)
        fsync_path(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._prune(keep=final, step=step)

    def _discard(self, path: Path, on_trashed: Optional[Callable[[], None]] = None) -> None:
        trash = self.root / f".trash-{path.name}"
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(path, trash)
        if on_trashed is not None:
            on_trashed()
        shutil.rmtree(trash)

    def _prune(self, keep: Path, step: int) -> None:
        complete = [p for p in self.complete_checkpoints() if p != keep]
        excess = len(complete) + 1 - self.keep_last
        fault = self._prune_fault
        for old in complete[: max(excess, 0)]:
            self._discard(old, None if fault is None else lambda: fault(step))

    def load(self, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
        """``(meta, this rank's tensors, this rank's JSON data)`` of a complete checkpoint."""
        path = Path(path)
        meta = read_meta(path)
        if meta["world_size"] != self.world_size:
            raise CheckpointError(
                f"{path} was written by {meta['world_size']} ranks; this run has {self.world_size} "
                "(ZeRO-3 partitions are per rank: resume with the same number of ranks)"
            )
        for name, size in meta["files"].items():
            file = path / name
            if not file.is_file() or file.stat().st_size != size:
                raise CheckpointError(f"checkpoint file {file} is missing or truncated (expected {size} bytes)")
        tensors = load_rank_tensors(path, self.rank)
        rank_data = json.loads((path / rank_files(self.rank)[1]).read_text())
        return meta, tensors, rank_data
