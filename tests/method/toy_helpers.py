"""The 2-D toy of the learning tests: data, training loop and the 1-NFE score.

Data: two classes, each a ring of four tight Gaussians (every class is multi-modal, so a one-step
flow-matching sample, which lands near the conditional mean, is far from the data). Backbone: the
dual-time MLP, class ``NULL`` being the unconditional class. Score: sliced Wasserstein-2 distance
between 1-NFE samples and held-out data (lower is better).
"""
import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from twinflow.backbones.mlp import DualTimeMLP
from twinflow.method.config import TwinFlowConfig
from twinflow.method.objective import TwinFlowObjective, one_step_sample
from twinflow.method.teachers.build import build_teacher

NUM_CLASSES = 2
NULL = NUM_CLASSES  # DualTimeMLP's unconditional class index
BATCH = 128

Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def sample_data(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randint(0, NUM_CLASSES, (n,), generator=g)
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


def new_model(seed: int = 0) -> DualTimeMLP:
    torch.manual_seed(seed)
    return DualTimeMLP(num_classes=NUM_CLASSES, width=128)


def train(
    model: torch.nn.Module, cfg: TwinFlowConfig, batches: Batches, steps: int, *, lr: float = 2e-3,
    decay_to_zero: bool = False,
) -> list[float]:
    """``steps`` optimizer steps of the objective on ``batches()`` (x, class labels), with the teacher
    ``cfg.ema_decay_rate`` selects (built here, from the model as it is now). Returns the losses."""
    objective = TwinFlowObjective(cfg)
    teacher = build_teacher(model, cfg.ema_decay_rate, backend="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps) if decay_to_zero else None
    losses = []
    for _ in range(steps):
        x, k = batches()
        out = objective.training_step(model, x, k, torch.full_like(k, NULL), teacher)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        teacher.update()
        losses.append(out.loss.item())
    return losses


def one_step_score(model: torch.nn.Module, held_out_seed: int = 5, noise_seed: int = 7, n: int = 4000) -> float:
    """Sliced W2 between ``n`` 1-NFE samples (noise from ``noise_seed``) and ``n`` held-out points."""
    held_out, labels = sample_data(n, torch.Generator().manual_seed(held_out_seed))
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(noise_seed))
    return sliced_wasserstein(one_step_sample(model, noise, labels), held_out)


@contextmanager
def one_thread() -> Iterator[None]:
    """Small matrices: one thread is fastest, and the runs are deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
