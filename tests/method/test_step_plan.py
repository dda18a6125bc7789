"""The step plan says what ``training_step`` runs: for every combination of the keys it reads, the
forwards of the online model and of the teacher (count, rows, grad) and the teacher sessions match."""
import copy
import itertools

import pytest
import torch

from twinflow.backbones.mlp import DualTimeMLP
from twinflow.method.config import GroupProbs, TwinFlowConfig
from twinflow.method.groups import split_batch
from twinflow.method.objective import TwinFlowObjective
from twinflow.method.step_plan import StepPlan
from twinflow.training.memory_plan import largest_teacher_rows

from test_objective import CountingTeacher

B = 8
PROBS = {
    "all": GroupProbs(),
    "mul_adv": GroupProbs(e2e=0, mul=1, any=0, adv=1, one=0),  # no e2e/any/one row: RCGM cannot run
    "no_e2e": GroupProbs(e2e=0, mul=1, any=1, adv=0, one=1),  # no e2e row: no rectification
    "e2e_one": GroupProbs(e2e=1, mul=0, any=0, adv=0, one=1),
}
KEYS = list(itertools.product(
    [0.0, 0.5],  # enhanced_ratio
    [0, 1, 2],  # estimate_order
    [0.0, 0.5, 1.0],  # consistc_ratio
    [0.0, 0.5],  # dist_match_cof
    [False, True],  # use_image_free
))


class Recorder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, tt, cond):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.model(x, t, tt, cond)


def expected_calls(plan: StepPlan, split, guidance_rows: int):
    """The online and teacher forwards ``(rows, grad)`` that ``plan`` says a step makes, in order."""
    fw = plan.forwards(split)
    online = [(rows, False) for name in ("image_free", "adv_fake") if name in fw for rows in [fw[name][1]]]
    online.append((B, True))
    teacher = []
    if guidance_rows:
        teacher.append((guidance_rows, False))
    if "rcgm" in fw:
        n, rows = fw["rcgm"]
        (online if plan.rcgm_on_online else teacher).extend([(rows, False)] * n)
    if "rectification" in fw:
        online.append((fw["rectification"][1], False))
    return online, teacher


@pytest.mark.parametrize("ema_decay_rate", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("probs", list(PROBS))
def test_plan_matches_what_the_step_runs(probs, ema_decay_rate):
    torch.manual_seed(0)
    net = DualTimeMLP(num_classes=3, width=8, depth=1)
    x, c, u = torch.randn(B, 2), torch.randint(0, 3, (B,)), torch.full((B,), 3)
    for enr, order, consistc, dist, image_free in KEYS:
        cfg = TwinFlowConfig(probs=PROBS[probs], ema_decay_rate=ema_decay_rate, enhanced_ratio=enr,
                             estimate_order=order, consistc_ratio=consistc, dist_match_cof=dist,
                             use_image_free=image_free, kernels="eager")
        case = (probs, ema_decay_rate, enr, order, consistc, dist, image_free)
        online, teacher_net = Recorder(net), Recorder(copy.deepcopy(net))
        teacher = CountingTeacher(teacher_net)
        objective = TwinFlowObjective(cfg)
        out = objective.training_step(online, x, c, u, teacher)
        plan, split = objective.plan, out.split
        guided = out.forward_rows.get("guidance", 0)
        if "guidance" in plan.forwards(split):
            assert guided <= plan.forwards(split)["guidance"][1], case
        want_online, want_teacher = expected_calls(plan, split, guided)
        assert online.calls == want_online, case
        assert teacher_net.calls == want_teacher, case
        assert teacher.sessions == plan.needs_teacher_session(split), case
        # the memory plan's largest no-grad pass is the plan's
        no_grad = [rows for rows, grad in want_online + want_teacher if not grad]
        bound = max(no_grad + [plan.forwards(split).get("guidance", (0, 0))[1]], default=0)
        assert largest_teacher_rows(B, cfg) == bound, case


def test_plan_reads_the_config_once():
    plan = StepPlan.from_config(TwinFlowConfig(preset="flow_matching"))
    split = split_batch(B, TwinFlowConfig(preset="flow_matching").probs.as_dict())
    assert not (plan.guidance or plan.rcgm or plan.rectification or plan.image_free or plan.loss_on_all_rows)
    assert plan.forwards(split) == {"main": (1, B)} and not plan.needs_teacher_session(split)
    with pytest.raises(AttributeError):
        plan.guidance = True  # frozen
