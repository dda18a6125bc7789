"""Image-free TwinFlow (ALGORITHM.md §3.3, §3.5, §3.6) turns a pretrained flow-matching model into a
better one-step generator without seeing any data: on the 2-D toy of ``toy_helpers``.

1. Pretrain the dual-time MLP with plain flow matching (preset ``flow_matching``) on the toy data, with
   20 % of the labels replaced by the unconditional class, as classifier-free-guidance pretraining does.
   The flow-matching objective itself never trains the unconditional class, and image-free mode guides
   with it (``v_u``); without the drop the guided target uses an untrained embedding (measured with this
   file's settings: 1.10 -> 1.05, no real improvement).
2. Score its 1-NFE samples: sliced W2 to held-out data, at five (held-out set, sample noise) seeds.
3. Continue from that checkpoint with image-free TwinFlow and the reference's image-free values:
   ``use_image_free``, ``ema_decay_rate: 1.0`` (the teacher is a frozen copy of the pretrained model) and
   ``enhanced_ratio: 4.0`` (guided rows take ``v_u + 4 (v_c - v_u)`` of the frozen teacher outright,
   ``guide_replace``); the other keys are the ``twinflow`` preset's. The batch handed to
   ``training_step`` is a placeholder of zeros; only class labels (what a prompts-only dataset gives)
   vary. The learning rate decays linearly to 0 over this phase: at a constant 2e-3 the 1-NFE score
   swings between checkpoints (0.23 to 0.62 at 100-step checkpoints, six seeds); with the decay the end
   point is stable (below).
4. Score again at the same seeds.

The student distils the teacher's *guided* distribution, which is sharper than the data, so the score
(a distance to the data) settles near 0.4, not lower: with ``enhanced_ratio: 1.0`` (the plain conditional
teacher, which needs no unconditional class) a run from the model pretrained without the drop reaches 0.16.

Margin. Measured over 12 training runs (3 pretraining seeds x 4 fine-tuning seeds): the score's own
sampling noise (standard deviation over the five evaluation seeds) was 0.003-0.008 before and
0.015-0.024 after; the improvement was 28-48 times the larger of the two, and after / before was
0.28-0.41. The test requires an improvement above 10 times the noise it measures itself, and
after < 0.6 before: room for other platforms' numerics, none for a tie.

Measured (``python -m pytest -q -p no:cacheprovider tests/method/test_image_free_learning.py -s``, this
2-core CPU, 14 s for the file): before 1.118 (std 0.008), after 0.464 (std 0.023); improvement 0.654,
28 times the noise; after / before 0.41.

That the data values are never read is shown separately: from the same checkpoint and seeds, runs whose
placeholder is zeros, NaN, or a real data batch give bit-identical losses and weights.
"""
import copy

import pytest
import torch

from twinflow.method.config import TwinFlowConfig

from toy_helpers import BATCH, NULL, NUM_CLASSES, Batches, new_model, one_step_score, one_thread, sample_data, train

PRETRAIN_STEPS = 1000
LABEL_DROP = 0.2
FINETUNE_STEPS = 600
EVAL_SEEDS = [(100 + i, 200 + i) for i in range(5)]  # (held-out set, sample noise)
NOISE_MULTIPLE = 10


def image_free_config() -> TwinFlowConfig:
    return TwinFlowConfig(
        preset="twinflow", use_image_free=True, ema_decay_rate=1.0, enhanced_ratio=4.0, kernels="eager"
    )


@pytest.fixture(scope="module")
def pretrained() -> torch.nn.Module:
    with one_thread():
        model = new_model(seed=0)
        g = torch.Generator().manual_seed(1)

        def batches():
            x, k = sample_data(BATCH, g)
            return x, torch.where(torch.rand(BATCH, generator=g) < LABEL_DROP, NULL, k)

        train(model, TwinFlowConfig(preset="flow_matching", kernels="eager"), batches, PRETRAIN_STEPS)
    return model


def prompts_only(placeholder: torch.Tensor, seed: int) -> Batches:
    """Batches of a prompts-only dataset: ``placeholder`` stands where the data would be."""
    g = torch.Generator().manual_seed(seed)
    return lambda: (placeholder, torch.randint(0, NUM_CLASSES, (BATCH,), generator=g))


def finetune(pretrained: torch.nn.Module, placeholder: torch.Tensor, steps: int) -> tuple[torch.nn.Module, list[float]]:
    model = copy.deepcopy(pretrained)
    torch.manual_seed(3)  # the objective's noise and times
    losses = train(model, image_free_config(), prompts_only(placeholder, seed=4), steps, decay_to_zero=True)
    return model, losses


def scores(model: torch.nn.Module) -> torch.Tensor:
    return torch.tensor([one_step_score(model, held_out_seed=h, noise_seed=n) for h, n in EVAL_SEEDS])


def test_image_free_never_reads_the_data_values(pretrained):
    placeholders = {
        "zeros": torch.zeros(BATCH, 2),
        "nan": torch.full((BATCH, 2), float("nan")),
        "data": sample_data(BATCH, torch.Generator().manual_seed(9))[0],
    }
    with one_thread():
        runs = {name: finetune(pretrained, p, steps=30) for name, p in placeholders.items()}
    ref_model, ref_losses = runs["zeros"]
    start = pretrained.state_dict()
    ref = ref_model.state_dict()
    assert any(not torch.equal(ref[k], start[k]) for k in ref), "the runs must train for the comparison to mean much"
    for name, (model, losses) in runs.items():
        assert losses == ref_losses, name
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items()), name


def test_image_free_improves_one_step_score(pretrained):
    with one_thread():
        before = scores(pretrained)
        model, losses = finetune(pretrained, torch.zeros(BATCH, 2), FINETUNE_STEPS)
        after = scores(model)
    noise = max(before.std().item(), after.std().item())
    gain = (before.mean() - after.mean()).item()
    print(
        f"1-NFE sliced W2: before {before.mean():.3f} (std {before.std():.3f}), "
        f"after {after.mean():.3f} (std {after.std():.3f}); gain {gain:.3f} = {gain / noise:.0f} x noise"
    )
    assert all(torch.isfinite(torch.tensor(losses)))
    assert gain > NOISE_MULTIPLE * noise
    assert after.mean() < 0.6 * before.mean()
