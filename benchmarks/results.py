"""Collects the measurements of one benchmark run, evaluates the targets, prints the summary and
appends the run as one JSON record to ``benchmarks/results/<profile>_<device>.json``.

Every number in a record was measured in that run (or is derived from measured numbers and the stated
byte / FLOP counts). A record holds: date, git commit (and whether the tree had local changes), device
name, versions (python, torch, CUDA, triton, diffusers), profile, the timer used, the copy bandwidth,
each measurement, the targets with their status, and what was skipped and why.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .harness import Timing, copy_bandwidth, device_name, gpu_skip_reason

EMA_COPY_FRACTION = 0.90
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

TARGETS = (
    ("ema_bandwidth", "EMA update >= 90% of the copy bandwidth measured in the same run, at >= 1e8 elements"),
    ("ema_vs_foreach", "EMA update no slower than torch._foreach_lerp_ (same work: + shadow copy when there is one), "
                       "every EMA case"),
    ("ema_vs_compile", "EMA update no slower than torch.compile of the eager reference, every case that has it"),
    ("loss_vs_eager", "TwinFlow loss fwd+bwd >= 3x eager"),
    ("loss_vs_compile", "TwinFlow loss fwd+bwd >= 1x torch.compile"),
    ("embedding_vs_eager", "dual-time embedding fwd+bwd >= 2x eager at batch <= 16"),
    ("e2e_vs_baseline", "end-to-end step >= 1.3x the eager baseline (images/s)"),
)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def load_average() -> Optional[float]:
    """The 1-minute load average: other processes share a CPU machine, and the load says how much the
    CPU smoke timings can be trusted."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def environment(device: torch.device) -> dict:
    status = _git("status", "--porcelain")
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_local_changes": None if status is None else bool(status),
        "device": device_name(device),
        "device_type": device.type,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "diffusers": _version("diffusers"),
        },
    }


class BenchRun:
    """The measurements of one run (a pytest session or one ``run_gpu.py`` call)."""

    def __init__(self, profile: str, device: torch.device, timer: str):
        self.profile, self.device, self.timer = profile, device, timer
        self.torch_threads = torch.get_num_threads()  # intra-op threads while measuring
        self.load_at_start = load_average()
        self.measurements: list[dict] = []
        self.skipped: list[dict] = []
        self._copy: Optional[dict] = None

    @property
    def copy(self) -> dict:
        """The copy bandwidth, measured on first use."""
        if self._copy is None:
            self._copy = copy_bandwidth(self.device, self.profile)
        return self._copy

    def record_kernel(self, case, variant: str, pass_: str, timing: Timing, bytes_moved: Optional[int],
                      check: Optional[str]) -> dict:
        entry = {"kind": "kernel", "kernel": case.kernel, "case": case.name, "variant": variant, "pass": pass_,
                 **timing.as_dict(), "bytes_moved": bytes_moved, "gbps": None, "copy_fraction": None, "check": check}
        if bytes_moved is not None:
            entry["gbps"] = bytes_moved / timing.median_s / 1e9
            entry["copy_fraction"] = entry["gbps"] / self.copy["gbps"]
        if case.kernel == "ema":
            entry["numel"] = sum(int(torch.Size(s).numel()) for s in case.size["shapes"])
            entry["tensors"] = len(case.size["shapes"])
        self.measurements.append(entry)
        return entry

    def record_e2e(self, variant: str, config: str, timing: Timing, summary: dict) -> dict:
        entry = {"kind": "e2e", "variant": variant, "config": config, **timing.as_dict(), **summary}
        self.measurements.append(entry)
        return entry

    def skip(self, what: str, why: str) -> None:
        self.skipped.append({"what": what, "why": why})

    def record(self) -> dict:
        return {
            **environment(self.device),
            "profile": self.profile,
            "timer": self.timer,
            "torch_threads": self.torch_threads,
            "load_average_1m": {"start": self.load_at_start, "end": load_average()},
            "copy_bandwidth": self._copy,
            "measurements": self.measurements,
            "targets": evaluate_targets(self),
            "skipped": self.skipped,
            "notes": case_notes(self.profile),
        }


def _kernel_times(run: BenchRun, kernel: str, pass_: str) -> dict[str, dict[str, dict]]:
    """{case: {variant: measurement}} for one kernel and pass."""
    out: dict[str, dict[str, dict]] = {}
    for m in run.measurements:
        if m["kind"] == "kernel" and m["kernel"] == kernel and m["pass"] == pass_:
            out.setdefault(m["case"], {})[m["variant"]] = m
    return out


def _speedup_checks(cases: dict[str, dict[str, dict]], baseline: str, threshold: float) -> list[tuple[bool, str]]:
    checks = []
    for case, variants in cases.items():
        if "fused" in variants and baseline in variants:
            ratio = variants[baseline]["median_s"] / variants["fused"]["median_s"]
            checks.append((ratio >= threshold, f"{case}: {ratio:.2f}x"))
    return checks


def evaluate_targets(run: BenchRun) -> list[dict]:
    """Each target as met / missed (with the measured values) or not evaluated (with the reason).

    Targets are performance statements about the GPU sizes, so they are evaluated only for the ``gpu``
    profile on a CUDA device; a smoke run reports them as not evaluated.
    """
    if run.profile != "gpu" or run.device.type != "cuda":
        why = ("not evaluated: no CUDA device in this run" if run.device.type != "cuda" else
               "not evaluated: smoke sizes") + " (targets apply to the GPU sizes on a CUDA device)"
        return [{"target": key, "statement": text, "status": why, "details": []} for key, text in TARGETS]
    checks: dict[str, list[tuple[bool, str]]] = {key: [] for key, _ in TARGETS}
    for case, variants in _kernel_times(run, "ema", "update").items():
        fused = variants.get("fused")
        if fused is None:
            continue
        if fused["numel"] >= 1e8:
            checks["ema_bandwidth"].append((fused["copy_fraction"] >= EMA_COPY_FRACTION,
                                            f"{case}: {fused['copy_fraction']:.1%} of copy"))
        for baseline in ("foreach", "compile"):
            if baseline in variants:
                ratio = variants[baseline]["median_s"] / fused["median_s"]
                checks[f"ema_vs_{baseline}"].append((ratio >= 1.0, f"{case}: {baseline} / fused time = {ratio:.2f}"))
    loss = _kernel_times(run, "twinflow_loss", "fwd+bwd")
    checks["loss_vs_eager"] = _speedup_checks(loss, "eager", 3.0)
    checks["loss_vs_compile"] = _speedup_checks(loss, "compile", 1.0)
    checks["embedding_vs_eager"] = _speedup_checks(_kernel_times(run, "dual_time_embedding", "fwd+bwd"), "eager", 2.0)
    e2e = {m["variant"]: m for m in run.measurements if m["kind"] == "e2e"}
    if {"baseline", "ours"} <= set(e2e):
        ratio = e2e["ours"]["images_per_s"] / e2e["baseline"]["images_per_s"]
        checks["e2e_vs_baseline"].append((ratio >= 1.3, f"ours / baseline = {ratio:.2f}x"))
    out = []
    for key, text in TARGETS:
        results = checks[key]
        if not results:
            status = "not evaluated: no measurement in this run"
        else:
            status = "met" if all(ok for ok, _ in results) else "missed"
        out.append({"target": key, "statement": text, "status": status,
                    "details": [("ok: " if ok else "MISSED: ") + d for ok, d in results]})
    return out


def write_record(record: dict, directory: Path = RESULTS_DIR) -> Path:
    """Appends ``record`` to ``<directory>/<profile>_<device type>.json`` (a JSON list of runs)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record['profile']}_{record['device_type']}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(record)
    path.write_text(json.dumps(runs, indent=1) + "\n")
    return path


def case_notes(profile: str) -> list[str]:
    """Why some cases leave a variant out."""
    from .kernel_cases import kernel_cases

    return [f"{c.key}: {c.note}" for c in kernel_cases(profile) if c.note]


def gpu_plan() -> list[str]:
    """What a GPU run measures (listed as skipped when there is no GPU)."""
    from .e2e import e2e_size
    from .kernel_cases import kernel_cases

    items = [f"{c.kernel} {c.name}: {', '.join(c.variants)} ({', '.join(c.passes)})" for c in kernel_cases("gpu")]
    items.append(f"end-to-end step, baseline vs ours: {e2e_size('gpu').describe()}")
    return items


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def summary_lines(record: dict) -> list[str]:
    """Human-readable summary of a run record (printed by pytest and by run_gpu.py)."""
    load = record["load_average_1m"]
    lines = [f"device: {record['device']} (1-minute load average {load['start']} at start, {load['end']} at end); "
             f"profile: {record['profile']}; "
             "versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
             f"timer: {record['timer']}; torch intra-op threads: {record['torch_threads']}"]
    if record["copy_bandwidth"]:
        lines.append(f"copy bandwidth: {record['copy_bandwidth']['gbps']:.1f} GB/s "
                     f"(dst.copy_(src) of {record['copy_bandwidth']['buffer_bytes'] / 2**20:.0f} MiB)")
    if record["profile"] == "smoke" and record["device_type"] == "cpu":
        lines.append("CPU SMOKE: sizes check the harness; fused kernels run in Triton's interpreter. Not performance claims.")
    for m in record["measurements"]:
        if m["kind"] == "kernel":
            bw = f"  {m['gbps']:.3g} GB/s = {100 * m['copy_fraction']:.3g}% of copy" if m["gbps"] is not None else ""
            lines.append(f"  {m['kernel']:<20} {m['case']:<32} {m['pass']:<8} {m['variant']:<8} "
                         f"{_fmt_time(m['median_s']):>10}{bw}")
        else:
            mem = f"{m['peak_memory_bytes'] / 2**30:.2f} GiB" if m["peak_memory_bytes"] is not None else "not measured (CPU)"
            mfu = f"{m['main_pass_mfu']:.1%}" if m["main_pass_mfu"] is not None else "not computed (no peak for this device)"
            lines.append(f"  e2e {m['variant']:<8} {m['images_per_s']:.3g} images/s, {_fmt_time(m['seconds_per_step'])}/step, "
                         f"peak memory {mem}, main-pass MFU {mfu}, attention {m['attention_backend']} "
                         f"(calls per path in the last step: {m.get('attention_paths_per_step', 'not recorded')})")
    lines.append("targets:")
    for t in record["targets"]:
        lines.append(f"  [{t['status']}] {t['statement']}")
        lines.extend(f"      {d}" for d in t["details"])
    lines.extend(f"note: {n}" for n in record["notes"])
    if record["skipped"]:
        lines.append("skipped:")
        lines.extend(f"  {s['what']}: {s['why']}" for s in record["skipped"])
    return lines


def skip_gpu_measurements(run: BenchRun) -> None:
    """Lists every GPU measurement as skipped (with the reason) when this machine cannot run them."""
    reason = gpu_skip_reason(run.profile)
    if reason is not None:
        for item in gpu_plan():
            run.skip(f"GPU {item}", reason)
