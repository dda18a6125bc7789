"""The atomic checkpoint store, single process (a one-rank world: barriers are no-ops).

The launcher tests kill real ranks mid-save; these pin the protocol's details quickly: what a crash at
each point leaves behind, pruning, and what loading refuses.
"""
from __future__ import annotations

import json
from collections import defaultdict
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from twinflow.training.checkpoint import (
    CheckpointError,
    CheckpointStore,
    capture_rng,
    ema_adapter_key,
    ema_shard_key,
    join_tensors,
    master_key,
    optim_key,
    rank_files,
    rank_state,
    restore_optimizer_state,
    restore_rank_state,
    restore_rng,
    split_optimizer_state,
    split_tensors,
)

REPO = Path(__file__).resolve().parents[2]


class Crash(Exception):
    pass


def _save(store: CheckpointStore, step: int, value: float) -> None:
    store.save(step, {"master.0": torch.full((5,), value)}, {"data": {"position": step}}, {"note": "x"})


def test_round_trip(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=2)
    _save(store, 3, 1.5)
    assert store.latest() == tmp_path / "step_00000003"
    meta, tensors, rank_data = store.load(store.latest())
    assert meta["step"] == 3 and meta["note"] == "x" and meta["world_size"] == 1
    assert torch.equal(tensors["master.0"], torch.full((5,), 1.5))
    assert rank_data == {"data": {"position": 3}}
    # Only safetensors and JSON: nothing that could be unpickled.
    assert sorted(p.suffix for p in store.latest().iterdir()) == [".json", ".json", ".safetensors"]


def test_crash_during_save_leaves_the_previous_checkpoint(tmp_path):
    def crash(step: int) -> None:
        if step == 4:
            raise Crash

    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=1, fault_after_rank_files=crash)
    _save(store, 2, 2.0)
    with pytest.raises(Crash):
        _save(store, 4, 4.0)
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    assert store.latest() == tmp_path / "step_00000002"
    assert [p.name for p in store.complete_checkpoints()] == ["step_00000002"]
    assert (tmp_path / ".tmp-step_00000004" / "rank-00000.safetensors").is_file()
    # keep_last=1 did not prune step 2 before a newer checkpoint was complete.
    assert torch.equal(store.load(store.latest())[1]["master.0"], torch.full((5,), 2.0))
    # The next save removes the leftovers.
    _save(store, 6, 6.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000006"]


def test_keep_last_prunes_oldest_only_after_the_new_one_is_complete(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=2)
    for step in (1, 2, 3, 4):
        _save(store, step, float(step))
    assert [p.name for p in store.complete_checkpoints()] == ["step_00000003", "step_00000004"]


def test_latest_without_pointer_falls_back_to_newest_complete(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=3)
    _save(store, 1, 1.0)
    _save(store, 2, 2.0)
    (tmp_path / "latest").unlink()  # a crash between the rename and the pointer update
    assert store.latest() == tmp_path / "step_00000002"
    assert CheckpointStore(tmp_path / "empty", 0, 1, 1).latest() is None


def test_load_refuses_truncated_files_and_other_world_sizes(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=2)
    _save(store, 1, 1.0)
    path = store.latest()
    with pytest.raises(CheckpointError, match="written by 1 ranks; this run has 2"):
        CheckpointStore(tmp_path, rank=0, world_size=2, keep_last=2).load(path)
    file = path / "rank-00000.safetensors"
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="rank-00000.safetensors is missing or truncated"):
        store.load(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        store.load(path)


def test_load_refuses_foreign_meta(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=2)
    _save(store, 1, 1.0)
    meta_path = store.latest() / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = "something-else"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a twinflow-zero3-checkpoint"):
        store.load(store.latest())


def test_split_and_join_tensors_round_trip():
    state = {"schedule": {"decay": 0.5, "num_updates": 3}, "tensors": {"ema.0": torch.ones(3)}, "list": [torch.zeros(2), 7]}
    tensors: dict[str, torch.Tensor] = {}
    data = split_tensors(state, "teacher", tensors)
    assert sorted(tensors) == ["teacher.list.0", "teacher.tensors.ema.0"]
    json.dumps(data)  # plain data only
    back = join_tensors(data, tensors)
    assert back["schedule"] == state["schedule"] and back["list"][1] == 7
    assert torch.equal(back["tensors"]["ema.0"], state["tensors"]["ema.0"])
    with pytest.raises(CheckpointError, match="teacher.list.0"):
        join_tensors(data, {"teacher.tensors.ema.0": torch.ones(3)})


def test_rng_states_round_trip():
    tensors, data = capture_rng(torch.device("cpu"))
    data = json.loads(json.dumps(data))
    expected = (torch.rand(3), random.random())
    torch.rand(5)
    random.random()
    restore_rng(tensors, data, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def _stepped_state(optimizer_class, **kwargs) -> dict:
    param = torch.nn.Parameter(torch.linspace(-1, 1, 7))
    optimizer = optimizer_class([param], lr=0.1, **kwargs)
    for _ in range(3):
        param.grad = torch.sin(param.detach() * 3)
        optimizer.step()
    return optimizer.state[param]


def test_optimizer_state_of_deepspeed_cpu_adam_and_torch_adamw_round_trips_exactly(tmp_path):
    """DeepSpeedCPUAdam (the optimizer of an offloaded GPU run; FusedAdam alike) keeps ``step`` as an int,
    torch's AdamW as a tensor: both, and a float, come back with their type and value through the files."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    states = [_stepped_state(DeepSpeedCPUAdam, adamw_mode=True), _stepped_state(torch.optim.AdamW)]
    states[0]["ratio"] = 0.1  # a float whose decimal form is not exact in binary
    assert isinstance(states[0]["step"], int) and isinstance(states[1]["step"], torch.Tensor)
    tensors: dict[str, torch.Tensor] = {"master.0": torch.zeros(1)}
    plain: dict = {}
    for group, state in enumerate(states):
        split_optimizer_state(state, group, tensors, plain)
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=1)
    store.save(1, tensors, {"optim": plain}, {})
    _, tensors, rank_data = store.load(store.latest())
    for group, state in enumerate(states):
        fresh: dict = {}  # a resumed optimizer before its first step
        restore_optimizer_state(fresh, group, tensors, rank_data["optim"], torch.device("cpu"))
        live = {k: v.clone() * 0 if isinstance(v, torch.Tensor) else v for k, v in state.items()}  # a stepped one
        restore_optimizer_state(live, group, tensors, rank_data["optim"], torch.device("cpu"))
        for got in (fresh, live):
            assert sorted(got) == sorted(state)
            for key, value in state.items():
                assert type(got[key]) is type(value), key
                assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
    with pytest.raises(CheckpointError, match="'step' of sub-group 0 is int, this run's optimizer keeps Tensor"):
        restore_optimizer_state({"step": torch.tensor(0.0), "exp_avg": torch.zeros(7), "exp_avg_sq": torch.zeros(7),
                                 "ratio": 0.0}, 0, tensors, rank_data["optim"], torch.device("cpu"))


@pytest.mark.parametrize("bad", ["teacher.ema.1", "master.0", "optim.0.exp_avg"])
def test_nonfinite_tensors_are_never_committed(tmp_path, bad):
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=3)
    good = {"master.0": torch.ones(5), "optim.0.exp_avg": torch.zeros(5), "teacher.ema.0": torch.ones(3),
            "teacher.ema.1": torch.ones(3), "rng.torch_cpu": torch.get_rng_state()}
    store.save(2, good, {}, {})
    poisoned = {k: v.clone() for k, v in good.items()}
    poisoned[bad][1] = float("nan") if bad.startswith("teacher") else float("inf")
    with pytest.raises(CheckpointError, match=rf"step 4 refused: tensor '{bad}' on rank 0 holds NaN or inf"):
        store.save(4, poisoned, {}, {})
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]  # nothing written


KILL_IN_PRUNE = """
import os, sys, torch
from twinflow.training.checkpoint import CheckpointStore
def die(step):
    os._exit(44)
store = CheckpointStore(sys.argv[1], rank=0, world_size=1, keep_last=1, fault_in_prune=die)
for step in (2, 4):
    store.save(step, {"master.0": torch.full((5,), float(step))}, {}, {})
"""


def test_kill_during_pruning_leaves_trash_that_the_next_start_removes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**__import__("os").environ, "PYTHONPATH": str(repo)}
    rc = subprocess.run([sys.executable, "-c", KILL_IN_PRUNE, str(tmp_path)], env=env, cwd=repo, timeout=120).returncode
    assert rc == 44  # killed while pruning step 2, after step 4 was committed
    assert sorted(p.name for p in tmp_path.iterdir()) == [".trash-step_00000002", "latest", "step_00000004"]
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=1)
    assert store.latest() == tmp_path / "step_00000004"  # the trash is never mistaken for a checkpoint
    (tmp_path / ".tmp-step_00000006").mkdir()  # and a save's leftover
    assert CheckpointStore(tmp_path, rank=1, world_size=2, keep_last=1).sweep_leftovers() == []  # rank 0's job
    assert store.sweep_leftovers() == [".tmp-step_00000006", ".trash-step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004"]


# ------------------------------------------------------------------------------------------ the layout
def test_the_layout_names_are_the_on_disk_format():
    """Literal on purpose: these are the names inside existing checkpoint folders."""
    assert rank_files(3) == ("rank-00003.safetensors", "rank-00003.json")
    assert (master_key(2), optim_key(2, "exp_avg")) == ("master.2", "optim.2.exp_avg")
    assert (ema_shard_key(1), ema_adapter_key(4)) == ("teacher.tensors.ema.1", "teacher.ema_adapter.4")


def test_only_checkpoint_py_spells_the_layout():
    """The trainer, export and the rest ask twinflow/training/checkpoint.py for file and key names."""
    spelled = re.compile(r'(master|optim)\.\{|teacher\.(tensors|ema_adapter)|rng\.torch_|rank-\{|step_\{'
                         r'|"meta\.json"|"latest"|"checkpoints"')
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "twinflow").rglob("*.py"))
                 if path.name != "checkpoint.py" and "kernels" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if spelled.search(line)]
    assert not offenders


class _Stateful:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def _fake_zero3_optimizer(masters: list[torch.Tensor]) -> SimpleNamespace:
    """What :func:`rank_state` reads of DeepSpeed's ZeRO-3 optimizer, and what restoring calls."""
    return SimpleNamespace(fp32_partitioned_groups_flat=masters, optimizer=SimpleNamespace(state=defaultdict(dict)),
                           _reassign_or_swap_out_partitioned_parameters=lambda i: None, empty_partition_cache=lambda: None)


def test_a_trainer_rank_state_round_trips_through_the_store(tmp_path):
    cpu = torch.device("cpu")
    optimizer = _fake_zero3_optimizer([torch.arange(4.0)])
    optimizer.optimizer.state[optimizer.fp32_partitioned_groups_flat[0]] = {"exp_avg": torch.ones(4), "step": 3}
    teacher = _Stateful({"schedule": {"decay": 0.5}, "tensors": {"ema.0": torch.full((4,), 2.0)}})
    loader = _Stateful({"position": 7})
    tensors, rank_data = rank_state(optimizer, teacher, loader, cpu)
    assert sorted(tensors) == sorted([master_key(0), optim_key(0, "exp_avg"), ema_shard_key(0), "rng.torch_cpu"])
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep_last=1)
    store.save(1, tensors, rank_data, {})
    _, tensors, rank_data = store.load(store.latest())

    fresh = _fake_zero3_optimizer([torch.zeros(4)])
    expected = torch.rand(2)
    teacher2, loader2 = _Stateful(None), _Stateful(None)
    restore_rank_state(fresh, teacher2, loader2, tensors, rank_data, cpu)
    assert torch.equal(fresh.fp32_partitioned_groups_flat[0], torch.arange(4.0))
    assert fresh.optimizer.state[fresh.fp32_partitioned_groups_flat[0]]["step"] == 3
    assert torch.equal(teacher2.state["tensors"]["ema.0"], torch.full((4,), 2.0)) and loader2.state == {"position": 7}
    assert torch.equal(torch.rand(2), expected)  # the RNG is back where it was when the state was taken
