"""Joint attention forward + backward on a padded text batch: the old masked SDPA against the packed paths
of ``twinflow.backbones.qwen_image.attention`` (and unpadded SDPA over every token as a reference).

    python benchmarks/attention_paths.py                 # CUDA when available: Qwen-Image heads, 1024 image tokens
    python benchmarks/attention_paths.py --device cpu    # CPU: 4 heads x 64, 256 image tokens, one thread

Batches: the guidance pass (4 prompts of 128 tokens + 4 negative prompts of 6, padded to 128), and 8
rows of 8 different text lengths (the grouped path's worst case: one SDPA call per row). Prints the
median milliseconds per forward + backward of each path; ``packed+plan`` includes building the plan
(once per model forward in the transformer, so amortised over its blocks).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers.models.attention_dispatch import AttentionBackendName  # noqa: E402

from twinflow.backbones.qwen_image import attention  # noqa: E402

BATCHES = {"guidance (4 x 128 + 4 x 6 tokens)": [128] * 4 + [6] * 4,
           "8 distinct lengths": [128, 120, 97, 77, 60, 33, 6, 1]}


def median_ms(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(device: torch.device, repeats: int) -> None:
    cuda = device.type == "cuda"
    heads, head_dim, image, text = (24, 128, 1024, 128) if cuda else (4, 64, 256, 128)
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    backend = AttentionBackendName("_native_flash")
    paths = ["grouped_sdpa"] + ([attention.packed_path(backend.value, device, dtype)] if cuda else [])
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}), torch {torch.__version__}, "
          f"{dtype}, {heads} heads x {head_dim}, {image} image tokens, text padded to {text}; "
          f"packed kernels: {paths}")
    for name, lengths in BATCHES.items():
        batch = len(lengths)
        mask = (torch.arange(text)[None, :] < torch.tensor(lengths)[:, None]).to(device)
        key_mask = torch.cat([mask, torch.ones(batch, image, dtype=torch.bool, device=device)], dim=1)
        q, k, v = (torch.randn(batch, text + image, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(batch, text + image, heads, head_dim, device=device, dtype=dtype)

        def sdpa(attn_mask):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=attn_mask)
            out.transpose(1, 2).backward(grad)

        plan = attention.plan_packing(mask, image)
        row = {"masked SDPA (old)": median_ms(lambda: sdpa(key_mask[:, None, None, :]), device, repeats),
               "unpadded SDPA, all tokens": median_ms(lambda: sdpa(None), device, repeats)}
        for path in paths:
            row[path] = median_ms(lambda: attention.packed_attention(q, k, v, plan, backend, path).backward(grad),
                                  device, repeats)
            row[path + "+plan"] = median_ms(
                lambda: attention.packed_attention(q, k, v, attention.plan_packing(mask, image), backend, path)
                .backward(grad), device, repeats)
        print(f"{name}: " + " | ".join(f"{k} {v:.2f} ms" for k, v in row.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    run(torch.device(args.device), args.repeats)


if __name__ == "__main__":
    main()
