"""TwinFlow learns a one-step generator where plain flow matching does not (ALGORITHM.md §3).

2-D data: two classes, each a ring of four tight Gaussians (so every class is multi-modal and a one-step
flow-matching sample, which lands near the conditional mean, is far from the data). Same backbone, seed,
data stream, optimiser and number of steps; only the objective's preset differs. The distance is the
sliced Wasserstein-2 distance between 1-NFE samples and held-out data.
"""
import math

import torch

from twinflow.backbones.mlp import DualTimeMLP
from twinflow.method.config import TwinFlowConfig
from twinflow.method.objective import TwinFlowObjective, one_step_sample
from twinflow.method.teachers.build import build_teacher

STEPS = 500
BATCH = 128


def sample_data(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randint(0, 2, (n,), generator=g)
    j = torch.randint(0, 4, (n,), generator=g)
    angle = j.float() * math.pi / 2 + k.float() * math.pi / 4
    centers = torch.stack([angle.cos(), angle.sin()], 1) * 2
    return centers + 0.1 * torch.randn(n, 2, generator=g), k


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256) -> float:
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(n_proj, a.shape[1], generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    pa = (a @ dirs.T).sort(0).values
    pb = (b @ dirs.T).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def train_and_score(preset: str) -> float:
    torch.manual_seed(0)
    model = DualTimeMLP(num_classes=2, width=128)
    cfg = TwinFlowConfig(preset=preset, kernels="eager")
    objective = TwinFlowObjective(cfg)
    teacher = build_teacher(model, cfg.ema_decay_rate, backend="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, k = sample_data(BATCH, g)
        out = objective.training_step(model, x, k, torch.full_like(k, 2), teacher)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        teacher.update()
    held_out, labels = sample_data(4000, torch.Generator().manual_seed(5))
    torch.manual_seed(7)
    samples = one_step_sample(model, torch.randn(4000, 2), labels)
    return sliced_wasserstein(samples, held_out)


def test_twinflow_one_step_samples_beat_flow_matching():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest and deterministic
    try:
        twinflow = train_and_score("twinflow")
        flow_matching = train_and_score("flow_matching")
    finally:
        torch.set_num_threads(threads)
    print(f"1-NFE sliced W2: twinflow {twinflow:.3f}, flow matching {flow_matching:.3f}")
    # measured here: ~0.35 vs ~1.1; the bar leaves room for numerics across platforms, not for a tie
    assert twinflow < 0.6 * flow_matching
    assert twinflow < 0.6
