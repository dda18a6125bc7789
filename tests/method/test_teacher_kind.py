"""``TeacherKind.from_decay_rate`` is the one reading of ``ema_decay_rate``: every place that depends on
the teacher's kind follows it (forcing another answer changes what each of them does)."""
import types
import warnings

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from twinflow.backbones.mlp import DualTimeMLP
from twinflow.method.config import TwinFlowConfig
from twinflow.method.objective import TwinFlowObjective
from twinflow.method.step_plan import StepPlan
from twinflow.method.teachers import OnlineTeacher, TeacherKind
from twinflow.method.teachers import build as build_module
from twinflow.method.teachers.adapter import (
    AdapterEMATeacher,
    DisabledAdapterTeacher,
    LoraTeacherState,
    adapter_pairs,
)
from twinflow.method.teachers.build import ReleasingTeacher, build_run_teacher, build_teacher
from twinflow.method.teachers.dense import CopyEMATeacher, FrozenTeacher

KINDS = list(TeacherKind)
RATE = 0.5  # any rate the EMA teachers accept; the forced kind decides


@pytest.mark.parametrize("rate, kind", [(0.0, TeacherKind.ONLINE), (1e-6, TeacherKind.EMA), (0.5, TeacherKind.EMA),
                                        (0.99, TeacherKind.EMA), (1.0, TeacherKind.FROZEN)])
def test_the_rule(rate, kind):
    assert TeacherKind.from_decay_rate(rate) is kind


@pytest.fixture
def force_kind(monkeypatch):
    """Make the rule answer ``kind`` whatever the rate."""

    def force(kind):
        monkeypatch.setattr(TeacherKind, "from_decay_rate", classmethod(lambda cls, rate: kind))

    return force


class Lora(torch.nn.Module):
    """A backbone-free module with peft adapters ``default`` and ``ema``: the adapter teachers need no backbone."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(2, 8), torch.nn.Linear(8, 2)

    def forward(self, x, t, tt, cond):
        return self.out(torch.relu(self.inp(x)))


def lora_module():
    module = Lora()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # the second adapter
        for name in ("default", "ema"):
            inject_adapter_in_model(LoraConfig(r=2, target_modules=["inp", "out"]), module, adapter_name=name)
    return module


@pytest.mark.parametrize("kind", KINDS)
def test_plain_and_lora_builders_follow_the_kind(force_kind, kind):
    force_kind(kind)
    plain = build_teacher(DualTimeMLP(width=8, depth=1), RATE, backend="eager")
    assert type(plain) is {TeacherKind.ONLINE: OnlineTeacher, TeacherKind.FROZEN: FrozenTeacher,
                           TeacherKind.EMA: CopyEMATeacher}[kind]
    lora = build_teacher(lora_module(), RATE, backend="eager", lora=True)
    assert type(lora) is {TeacherKind.ONLINE: OnlineTeacher, TeacherKind.FROZEN: DisabledAdapterTeacher,
                          TeacherKind.EMA: AdapterEMATeacher}[kind]


class ShardStub:
    def __init__(self, *args, **kwargs):
        self.args = args


class FakeZeroOptimizer:
    def empty_partition_cache(self):
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_run_builder_follows_the_kind(force_kind, monkeypatch, kind):
    frozen = type("FrozenShardStub", (ShardStub,), {})
    ema = type("ShardEMAStub", (ShardStub,), {})
    monkeypatch.setattr(build_module, "FrozenShardTeacher", frozen)
    monkeypatch.setattr(build_module, "ShardEMATeacher", ema)
    force_kind(kind)
    engine = object()
    full = build_run_teacher(online=engine, module=DualTimeMLP(width=8, depth=1), optimizer=FakeZeroOptimizer(),
                             lora=False, ema_decay_rate=RATE, backend="eager")
    assert type(full) is {TeacherKind.ONLINE: OnlineTeacher, TeacherKind.FROZEN: frozen, TeacherKind.EMA: ema}[kind]
    module = lora_module()
    lora = build_run_teacher(online=engine, module=module, optimizer=FakeZeroOptimizer(), lora=True,
                             ema_decay_rate=RATE, backend="eager")
    if kind is TeacherKind.ONLINE:
        assert type(lora) is OnlineTeacher and lora.model is engine
    elif kind is TeacherKind.FROZEN:
        assert type(lora) is ReleasingTeacher and type(lora.inner) is DisabledAdapterTeacher
    else:
        assert type(lora) is ReleasingTeacher and type(lora.inner) is LoraTeacherState
        assert type(lora.inner.inner) is AdapterEMATeacher
        assert len(lora.state_dict()["ema_adapter"]) == len(adapter_pairs(module)) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_step_plan_and_objective_follow_the_kind(force_kind, kind):
    force_kind(kind)
    cfg = TwinFlowConfig(ema_decay_rate=RATE, use_image_free=True, kernels="eager")
    plan = StepPlan.from_config(cfg)
    assert plan.teacher is kind
    assert plan.rcgm_on_online == (kind is TeacherKind.FROZEN)
    assert TwinFlowObjective(cfg).arith.guide_replace == (kind is TeacherKind.FROZEN)


@pytest.mark.parametrize("kind", KINDS)
def test_memory_plan_follows_the_kind(force_kind, kind):
    from twinflow.training.memory_plan import teacher_kind

    force_kind(kind)
    assert teacher_kind(RATE) == kind.value


@pytest.mark.parametrize("kind", KINDS)
def test_export_of_ema_weights_follows_the_kind(force_kind, kind):
    from twinflow.training.export import ExportError, export_from_trainer

    class Entered(Exception):
        pass

    class Teacher:
        def session(self):
            raise Entered

    force_kind(kind)
    method = types.SimpleNamespace(ema_decay_rate=RATE)
    trainer = types.SimpleNamespace(config=types.SimpleNamespace(method=method), teacher=Teacher())
    # An online teacher has no EMA to export; the others export from inside the teacher session.
    with pytest.raises(ExportError if kind is TeacherKind.ONLINE else Entered):
        export_from_trainer(trainer, "unused", weights="ema")
