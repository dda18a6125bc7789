"""Batch split (§3.2) and per-group times (§3.3)."""
import pytest
import torch

from twinflow.method.config import GROUPS, TwinFlowConfig
from twinflow.method.groups import BatchTooSmallError, split_batch
from twinflow.method.times import assign_group_times, sample_base_times

FOUR = {"e2e": 1, "mul": 1, "any": 1, "adv": 1, "one": 0}


def reference_split(batch_size, weights):
    """The reference's rule: round each size, the remainder goes to the last group."""
    names = [g for g in GROUPS if g != "one" or weights["one"] > 0]
    total = sum(weights.values())
    sizes = [round(batch_size * weights[g] / total) for g in names[:-1]]
    out = dict(zip(names, sizes + [batch_size - sum(sizes)]))
    return {g: out.get(g, 0) for g in GROUPS}


@pytest.mark.parametrize("batch_size", [4, 8, 12, 16, 64])
def test_equals_reference_when_batch_is_a_multiple_of_the_weight_sum(batch_size):
    assert split_batch(batch_size, FOUR).sizes == reference_split(batch_size, FOUR)


def test_b6_gives_every_weighted_group_a_row():
    sizes = split_batch(6, FOUR).sizes
    assert sizes == {"e2e": 2, "mul": 2, "any": 1, "adv": 1, "one": 0}
    assert reference_split(6, FOUR)["adv"] == 0  # what the deviation fixes


@pytest.mark.parametrize("batch_size", range(4, 40))
@pytest.mark.parametrize(
    "weights",
    [FOUR, {"e2e": 1, "mul": 1, "any": 0, "adv": 1, "one": 1}, {"e2e": 5, "mul": 1, "any": 1, "adv": 0.1, "one": 0}],
)
def test_awkward_sizes(batch_size, weights):
    split = split_batch(batch_size, weights)
    assert sum(split.sizes.values()) == batch_size
    for g in GROUPS:
        if weights[g] > 0:
            assert split.sizes[g] >= 1
            # largest remainder never strays more than one row from the exact quota, except where a
            # starved group took one row from the largest group
            quota = batch_size * weights[g] / sum(weights.values())
            assert abs(split.sizes[g] - quota) < 2
        else:
            assert split.sizes[g] == 0
    # contiguous, in order
    start = 0
    for g in GROUPS:
        assert split.slices[g].start == start
        start = split.slices[g].stop


def test_batch_too_small_is_a_clear_error():
    with pytest.raises(BatchTooSmallError, match="micro batch size 3 is smaller than the number of active groups 4"):
        split_batch(3, FOUR)


def test_group_times_and_signs():
    torch.manual_seed(0)
    split = split_batch(10, {"e2e": 1, "mul": 1, "any": 1, "adv": 1, "one": 1})
    t, tt, t_min = sample_base_times(10, (1.0, 1.0, 1.0), 1.0, torch.device("cpu"))
    assert torch.all((t >= 0) & (t <= 1)) and torch.all(tt <= t) and torch.all(t_min <= t)
    assert torch.all(t - t_min <= 0.05 * t + 1e-7)
    times = assign_group_times(t, tt, t_min, split)
    sl = split.slices
    assert torch.all(times.t[sl["e2e"]] == 1) and torch.all(times.tt[sl["e2e"]] == 0)
    assert torch.equal(times.tt[sl["mul"]], t_min[sl["mul"]]) and torch.equal(times.t[sl["mul"]], t[sl["mul"]])
    assert torch.equal(times.tt[sl["any"]], tt[sl["any"]])
    assert torch.all(times.tt[sl["one"]] == 0)
    assert torch.equal(times.t[sl["adv"]], -t[sl["adv"]]) and torch.equal(times.tt[sl["adv"]], -t[sl["adv"]])
    # the inputs were not modified in place
    assert torch.all(t >= 0)


def test_time_distribution_scale_and_beta():
    torch.manual_seed(0)
    t, tt, _ = sample_base_times(20000, (2.0, 5.0, 0.5), 0.0, torch.device("cpu"))
    assert t.max() <= 0.5
    assert abs(t.mean().item() - 0.5 * 2 / 7) < 0.01  # Beta(2, 5) mean, scaled
    assert torch.equal(tt, t)  # cor = 0 keeps tt = t


def test_config_presets_and_unknown_keys():
    from twinflow.utils.typed_config import ConfigError, from_dict

    fm = from_dict(TwinFlowConfig, {"preset": "flow_matching"})
    assert (fm.consistc_ratio, fm.enhanced_ratio, fm.estimate_order) == (0.0, 0.0, 0)
    assert fm.probs.as_dict() == {"e2e": 0, "mul": 1, "any": 0, "adv": 0, "one": 0}
    over = from_dict(TwinFlowConfig, {"preset": "rcgm_practice", "dist_match_cof": 0.3})
    assert over.dist_match_cof == 0.3 and over.probs.adv == 0
    with pytest.raises(ConfigError, match="'dist_match_coef'"):
        from_dict(TwinFlowConfig, {"dist_match_coef": 0.3})
    with pytest.raises(ConfigError, match="'probs.ady'"):
        from_dict(TwinFlowConfig, {"probs": {"ady": 1}})
    with pytest.raises(ConfigError, match="estimate_order"):
        from_dict(TwinFlowConfig, {"estimate_order": 1.5})
    with pytest.raises(ConfigError, match="consistc_ratio must lie"):
        from_dict(TwinFlowConfig, {"consistc_ratio": 2.0})
