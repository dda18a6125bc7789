"""TwinFlow learns a one-step generator where plain flow matching does not (ALGORITHM.md §3).

The 2-D toy of ``toy_helpers`` (two classes, each a ring of four tight Gaussians). Same backbone, seed,
data stream, optimiser and number of steps; only the objective's preset differs. The distance is the
sliced Wasserstein-2 distance between 1-NFE samples and held-out data.
"""
import torch

from twinflow.method.config import TwinFlowConfig

from toy_helpers import BATCH, new_model, one_step_score, one_thread, sample_data, train

STEPS = 500


def train_and_score(preset: str) -> float:
    model = new_model(seed=0)
    g = torch.Generator().manual_seed(1)
    train(model, TwinFlowConfig(preset=preset, kernels="eager"), lambda: sample_data(BATCH, g), STEPS)
    return one_step_score(model)


def test_twinflow_one_step_samples_beat_flow_matching():
    with one_thread():
        twinflow = train_and_score("twinflow")
        flow_matching = train_and_score("flow_matching")
    print(f"1-NFE sliced W2: twinflow {twinflow:.3f}, flow matching {flow_matching:.3f}")
    # measured here: ~0.35 vs ~1.1; the bar leaves room for numerics across platforms, not for a tie
    assert twinflow < 0.6 * flow_matching
    assert twinflow < 0.6
