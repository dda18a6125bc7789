"""Turns recorded runs into the plot and the Markdown tables of BENCHMARKS.md.

    python benchmarks/report.py                        # every benchmarks/results/*.json, latest run of each
    python benchmarks/report.py benchmarks/results/gpu_cuda.json --run -1

For each results file it writes ``<file stem>.png`` beside it (kernel speed-ups over the eager
reference, and the end-to-end throughput) and prints the tables. Everything shown comes from the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import RESULTS_DIR  # noqa: E402

VARIANT_ORDER = ("eager", "compile", "foreach", "fused")


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _kernel_groups(record: dict) -> dict[tuple[str, str, str], dict[str, dict]]:
    groups: dict[tuple[str, str, str], dict[str, dict]] = {}
    for m in record["measurements"]:
        if m["kind"] == "kernel":
            groups.setdefault((m["kernel"], m["case"], m["pass"]), {})[m["variant"]] = m
    return groups


def markdown(record: dict) -> str:
    env = record["versions"]
    lines = [
        f"Run of {record['date_utc']} on **{record['device']}** (profile `{record['profile']}`, commit "
        f"`{(record['git_commit'] or 'unknown')[:12]}`{' + local changes' if record['git_local_changes'] else ''}, "
        f"1-minute load average {record['load_average_1m']['start']} at start and {record['load_average_1m']['end']} at end, "
        f"{record['torch_threads']} torch intra-op thread(s)); "
        f"python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
        f"diffusers {env['diffusers']}. Timer: {record['timer']}.",
        "",
    ]
    if record["copy_bandwidth"]:
        c = record["copy_bandwidth"]
        lines += [f"Copy bandwidth (`dst.copy_(src)`, {c['buffer_bytes'] / 2**20:.0f} MiB float32, 2 x size moved): "
                  f"{c['gbps']:.3g} GB/s.", ""]
    lines += ["| kernel | case | pass | variant | median time | GB/s | of copy BW | speed-up vs eager |",
              "|---|---|---|---|---|---|---|---|"]
    for (kernel, case, pass_), variants in _kernel_groups(record).items():
        eager = variants.get("eager")
        for name in VARIANT_ORDER:
            m = variants.get(name)
            if m is None:
                continue
            gbps = f"{m['gbps']:.3g}" if m["gbps"] is not None else "-"
            frac = f"{m['copy_fraction']:.1%}" if m["copy_fraction"] is not None else "-"
            speed = f"{eager['median_s'] / m['median_s']:.2f}x" if eager else "-"
            lines.append(f"| {kernel} | {case} | {pass_} | {name} | {_time(m['median_s'])} | {gbps} | {frac} | {speed} |")
    e2e = [m for m in record["measurements"] if m["kind"] == "e2e"]
    if e2e:
        lines += ["", f"End-to-end step: {e2e[0]['config']}.", "",
                  "| variant | images/s | time/step | peak memory | main-pass MFU | all-pass MFU | attention |",
                  "|---|---|---|---|---|---|---|"]
        for m in e2e:
            mem = f"{m['peak_memory_bytes'] / 2**30:.2f} GiB" if m["peak_memory_bytes"] is not None else "not measured (CPU)"
            mfu = f"{m['main_pass_mfu']:.1%}" if m["main_pass_mfu"] is not None else "- (no peak for this device)"
            all_mfu = f"{m['all_pass_mfu']:.1%}" if m["all_pass_mfu"] is not None else "-"
            lines.append(f"| {m['variant']} | {m['images_per_s']:.3g} | {_time(m['seconds_per_step'])} | {mem} | {mfu} | "
                         f"{all_mfu} | `{m['attention_backend']}` {_paths(m)} |")
    lines += ["", "| target | status |", "|---|---|"]
    for t in record["targets"]:
        details = "; ".join(t["details"])
        lines.append(f"| {t['statement']} | {t['status']}{': ' + details if details else ''} |")
    return "\n".join(lines)


def _paths(measurement: dict) -> str:
    """The attention paths of the last timed step, e.g. ``(dense 14, grouped_sdpa 2)``."""
    paths = measurement.get("attention_paths_per_step")
    return "(" + ", ".join(f"{k} {v}" for k, v in sorted(paths.items())) + ")" if paths else ""


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _kernel_groups(record)
    e2e = [m for m in record["measurements"] if m["kind"] == "e2e"]
    smoke = record["profile"] == "smoke" and record["device_type"] == "cpu"
    fig, (ax_k, ax_e) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [4, 1]})
    labels = [f"{k}\n{c}\n{p}" for k, c, p in groups]
    width = 0.8 / len(VARIANT_ORDER)
    for i, name in enumerate(VARIANT_ORDER):
        xs, ys = [], []
        for j, variants in enumerate(groups.values()):
            if name in variants and "eager" in variants:
                xs.append(j + (i - (len(VARIANT_ORDER) - 1) / 2) * width)
                ys.append(variants["eager"]["median_s"] / variants[name]["median_s"])
        if xs:
            ax_k.bar(xs, ys, width, label=f"{name} (Triton interpreter)" if smoke and name == "fused" else name)
    ax_k.axhline(1.0, color="black", linewidth=0.8)
    ax_k.set_yscale("log")
    ax_k.set_xticks(range(len(labels)), labels, fontsize=6)
    ax_k.set_ylabel("speed-up over the eager reference (median time ratio)")
    ax_k.legend(fontsize=8)
    ax_k.set_title("kernels")
    if e2e:
        ax_e.bar([m["variant"] for m in e2e], [m["images_per_s"] for m in e2e], color=["tab:gray", "tab:blue"][: len(e2e)])
        ax_e.set_ylabel("images / s")
    ax_e.set_title("training step")
    note = " -- CPU SMOKE: harness check, fused kernels interpreted, not a performance claim" if smoke else ""
    fig.suptitle(f"{record['device']}, {record['date_utc']}{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="results files (default: benchmarks/results/*.json)")
    parser.add_argument("--run", type=int, default=-1, help="which run of each file (default: the latest)")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS_DIR.glob("*.json"))
    if not files:
        sys.exit(f"no results in {RESULTS_DIR}; run the suite with TWINFLOW_BENCH_RECORD=1 or run_gpu.py first")
    for path in files:
        record = json.loads(path.read_text())[args.run]
        png = path.with_suffix(".png")
        plot(record, png)
        print(f"## {path.name} (plot: {png.name})\n\n{markdown(record)}\n")


if __name__ == "__main__":
    main()
