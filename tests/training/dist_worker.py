"""Launched by ``tests/training/test_distributed.py`` on 2 CPU ranks through the real ``deepspeed``
launcher. It runs every in-process check of the ZeRO-3 trainer in ONE launch (start-up dominates the
cost) and writes the measured values to ``<out>/results.json`` (rank 0); the test asserts on them.

    deepspeed --num_gpus 2 tests/training/dist_worker.py --out DIR

Checks, in order, on one Trainer (``main``) whose ZeRO-3 settings keep every parameter *persistent*
and reuse gathered parameters across the whole step (the worst case for stale gathered copies):

1. the loss on a fixed batch with fixed noise falls over training (flow-matching preset, see below),
   and every loss is finite;
2. the EMA shards equal an EMA computed step by step from the gathered full float32 weights;
3. a forward in the teacher session equals a plain (unpartitioned) model loaded with the gathered EMA,
   and an online forward right after the session equals a plain model with the online weights;
4. the export (live, and offline from a checkpoint) round-trips through ``from_pretrained``;
5. an injected non-finite loss skips the step (weights, optimizer, EMA, LR schedule untouched) and is
   counted; ``max_consecutive_nonfinite`` in a row raise; a NaN in one rank's EMA shard makes every
   rank refuse the save;
6. LoRA: the ``ema`` adapter teacher matches a plain model, survives a checkpoint, and exports as a
   peft adapter and a merged transformer;
7. ZeRO-3 all-gathers per optimizer step, DeepSpeed's per-forward trace against the trainer's per-step
   trace (:func:`gather_checks`).

Then a second Trainer (``straight``) trains the tiny config for 6 steps from scratch: the reference the
crash/kill/resume chain is compared with. Finally a third one starts that chain: the same run in
``<out>/chain``, which dies during its save at step 4 (so this launch ends with status 44).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG = str(CONFIGS / "tiny_cpu.yaml")
LORA_CONFIG = str(CONFIGS / "tiny_cpu_lora.yaml")  # 2 micro batches per optimizer step


def gather_shards(views: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Full tensors from per-rank partitions (rank r holds elements [r*n, (r+1)*n) of the flat)."""
    out = {}
    for name, local in views.items():
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        numel = math.prod(shapes[name])
        out[name] = torch.cat(parts)[:numel].view(shapes[name]).clone()
    return out


def full_fp32(trainer) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {s.name: safe_get_full_fp32_param(s.param).detach().clone() for s in trainer.teacher.slots}


def fixed_batch(trainer):
    """A micro batch of this rank's items (with ``num_items = 2 * micro_batch_size`` and no shuffling,
    the batch this rank trains on at every step)."""
    from twinflow.training.data import SyntheticDataset

    dataset = SyntheticDataset(trainer.config.synthetic_data)
    rank, world = trainer.dist.rank, trainer.dist.world_size
    items = list(range(rank, len(dataset), world))[: trainer.config.train.micro_batch_size]
    return dataset.collate([dataset[i] for i in items])


def fixed_loss(trainer, batch) -> float:
    """The objective on ``batch`` with fixed times and noise (the training RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1234)
        out = trainer.objective.training_step(trainer.engine, batch.latents, batch.cond, batch.uncond, trainer.teacher)
    return float(out.loss)


def plain_backbone(config, state: dict[str, torch.Tensor]):
    from twinflow.backbones.qwen_image.build import build_qwen_image_backbone

    backbone = build_qwen_image_backbone(config.model, "cpu")
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    trainable = {n for n, p in backbone.named_parameters()}
    assert not unexpected and not (trainable - set(state)), (missing, unexpected)
    return backbone.eval()


def lora_checks(out: Path, rank: int) -> dict:
    """LoRA under ZeRO-3: the EMA adapter teacher, its checkpoint round trip and the adapter export."""
    from twinflow.backbones.qwen_image.backbone import QwenImageBackbone
    from twinflow.backbones.qwen_image.build import build_qwen_image_backbone
    from twinflow.method.teachers.adapter import adapter_pairs, adapter_state
    from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer
    from twinflow.training.config import load_train_config
    from twinflow.training.export import gather_transformer_state
    from twinflow.training.trainer import Trainer

    overrides = [f"train.output_dir={out / 'lora'}", "train.save_every=0"]
    trainer = Trainer(load_train_config(LORA_CONFIG, overrides))
    optimizer = type(trainer.optimizer.optimizer).__name__
    for _ in range(3):
        trainer.train_step()
    # Two micro batches per optimizer step: the EMA moves once per optimizer step.
    ema_updates = trainer.teacher.inner.inner.schedule.num_updates
    state = gather_transformer_state(trainer.backbone, rank)
    batch = fixed_batch(trainer)
    x, t, tt = batch.latents, torch.tensor([0.9, 0.6, 0.3, 0.1]), torch.tensor([0.5, 0.6, 0.0, 0.05])
    with torch.no_grad(), trainer.teacher.session() as teacher_model:
        v_teacher = teacher_model(x, t, tt, batch.cond)
    ckpt = trainer.save_checkpoint()
    export = trainer.export(out / "lora_export", weights="ema", merge_lora=True)
    before = trainer.teacher.state_dict()
    resumed = Trainer(load_train_config(LORA_CONFIG, overrides[1:] + [f"train.output_dir={out / 'lora_resumed'}",
                                                                    f"train.resume={ckpt}"]))
    after = resumed.teacher.state_dict()
    result = {
        "optimizer": optimizer,
        "ema_updates": ema_updates,
        "optimizer_steps": trainer.engine.global_steps,
        "ema_adapter_restored": all(torch.equal(a, b) for a, b in zip(before["ema_adapter"], after["ema_adapter"]))
        and len(before["ema_adapter"]) > 0,
        "schedule_restored": before["inner"]["schedule"] == after["inner"]["schedule"],
        "masters_restored": all(torch.equal(a, b) for a, b in zip(trainer.optimizer.fp32_partitioned_groups_flat,
                                                                 resumed.optimizer.fp32_partitioned_groups_flat)),
    }
    trainer.close()
    resumed.close()
    if rank != 0:
        return result
    with torch.no_grad():
        plain = build_qwen_image_backbone(trainer.config.model, "cpu").eval()
        plain.transformer.load_state_dict(state)
        with adapter_state(plain.transformer, "ema"):
            v_plain_ema = plain(x, t, tt, batch.cond)
        v_plain_online = plain(x, t, tt, batch.cond)
        merged = TwinFlowQwenImageTransformer.from_pretrained(str(export / "transformer")).eval()
        v_merged = QwenImageBackbone(merged, dtype=torch.float32, edit=False)(x, t, tt, batch.cond)
        plain.transformer.load_lora_adapter(str(export / "lora"), adapter_name="loaded", use_safetensors=True)
        loaded = adapter_pairs(plain.transformer, src="ema", dst="loaded")
    scale = float(v_teacher.abs().max())
    result.update({
        "scale": scale,
        "teacher_vs_plain_ema": float((v_teacher - v_plain_ema).abs().max()),
        "ema_vs_online": float((v_plain_ema - v_plain_online).abs().max()),
        "merged_vs_teacher": float((v_merged - v_teacher).abs().max()),
        "loaded_adapter_pairs": len(loaded),
        "loaded_adapter_max_diff": max(float((a - b).abs().max()) for a, b in loaded),
    })
    return result


GATHER_OVERRIDES = [
    # Every parameter partitioned (none persistent) and prefetch limits small against the 98.6k-element
    # model, as DeepSpeed's defaults are against a 20B one: per-module gathers, a prefetch window that a
    # pass boundary can cross, and no pass that fits in one bucket.
    "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0, stage3_prefetch_bucket_size: 2000, "
    "stage3_max_live_parameters: 20000, stage3_max_reuse_distance: 5000}}",
]


def gather_checks(out: Path) -> dict:
    """ZeRO-3 all-gathers per optimizer step of the full TwinFlow step (6 forwards + backward), counted with
    :class:`GatherCounter`: DeepSpeed's per-forward trace (``per_forward``) against the per-step trace
    (``per_step``), then the per-step trace with its prefetch fences off (``unfenced``, negative control)."""
    import sys

    sys.path.insert(0, str(CONFIGS.parent))  # the repository root: the counter lives in benchmarks/
    from benchmarks.gather_count import GatherCounter
    from twinflow.training.config import load_train_config
    from twinflow.training.trainer import Trainer

    results: dict = {}
    for mode in ("per_forward", "per_step"):
        trainer = Trainer(load_train_config(CONFIG, [f"train.output_dir={out / ('gathers_' + mode)}", "train.save_every=0",
                                                     "train.max_steps=6", *GATHER_OVERRIDES]))
        trainer.step_trace.active = mode == "per_step"  # inactive: DeepSpeed's reset at every top-level forward
        counter = GatherCounter(trainer)
        steps = [counter.step() for _ in range(4)]
        results[mode] = {"params": len(counter.numel), "losses": [r.loss for r, _ in steps],
                         "counts": [c.summary() for _, c in steps]}
        if mode == "per_step":
            trainer.step_trace.fence = False
            steps = [counter.step() for _ in range(2)]
            results["unfenced"] = {"params": len(counter.numel), "counts": [c.summary() for _, c in steps]}
            # One rank drops its trace alone (as a step with one forward fewer would): the ranks must agree
            # to record anew together; without that they call different collectives in reset_step.
            trainer.step_trace.fence = True
            coordinator = trainer.step_trace._coordinator
            complete_before = coordinator.is_complete_trace()
            if trainer.dist.rank == 1:
                coordinator._invalidate_trace()
            steps = [counter.step() for _ in range(3)]
            results["one_rank_dropped_trace"] = {"complete_before": complete_before,
                                                 "losses": [r.loss for r, _ in steps],
                                                 "complete_after": coordinator.is_complete_trace()}
        counter.remove()
        trainer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)

    from twinflow.method.ema_schedule import EMADecaySchedule
    from twinflow.kernels.ema import ema_update_reference_
    from twinflow.training.config import load_train_config
    from twinflow.training.export import export_checkpoint
    from twinflow.training.trainer import NonFiniteTrainingError, Trainer

    overrides = [
        f"train.output_dir={out / 'main'}",
        "train.max_steps=12",
        "train.save_every=0",
        "synthetic_data.num_items=8",  # 4 per rank: each rank sees the same micro batch every step
        "synthetic_data.shuffle=false",
        # Flow matching: its target does not move with the model, so "the loss on a fixed batch falls" is a
        # sharp check of the optimizer path (the TwinFlow target moves with the EMA teacher and the
        # model's own one-step samples). The tiny_cpu runs below train the full TwinFlow objective.
        "method.preset=flow_matching",
        "method.ema_decay_rate=0.9",
        "optim.lr=3.0e-3",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        "deepspeed.offload_optimizer=false",  # torch's AdamW here; the straight and chain runs use DeepSpeedCPUAdam
        "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 100000, "
        "stage3_max_reuse_distance: 1000000000, stage3_prefetch_bucket_size: 100000}}",
    ]
    trainer = Trainer(load_train_config(CONFIG, overrides))
    rank = trainer.dist.rank
    results: dict = {"world_size": trainer.dist.world_size, "optimizers": {"main": type(trainer.optimizer.optimizer).__name__}}
    persistent = [s.name for s in trainer.teacher.slots if s.param.ds_persist]
    results["persistent_params"] = len(persistent)
    results["trainable_params"] = len(trainer.teacher.slots)

    # 1 + 2: train, with a reference EMA from gathered full weights after every applied step.
    batch = fixed_batch(trainer)
    results["fixed_loss_before"] = fixed_loss(trainer, batch)
    shapes = {s.name: s.param.ds_shape for s in trainer.teacher.slots}
    reference = full_fp32(trainer)  # the EMA starts as a copy of the weights
    schedule = EMADecaySchedule(0.9)
    losses = []
    for _ in range(8):
        report = trainer.train_step()
        losses.append(report.loss)
        assert report.applied
        weights = full_fp32(trainer)
        names = sorted(weights)
        ema_update_reference_([reference[n] for n in names], [weights[n] for n in names], schedule.next_decay())
    results["losses"] = losses
    results["fixed_loss_after"] = fixed_loss(trainer, batch)
    ema = gather_shards(trainer.teacher.local_views(trainer.teacher.ema), shapes)
    online = full_fp32(trainer)
    results["ema_max_abs_err"] = max(float((ema[n] - reference[n]).abs().max()) for n in ema)
    results["ema_max_abs"] = max(float(reference[n].abs().max()) for n in ema)
    results["ema_vs_online_max_abs"] = max(float((ema[n] - online[n]).abs().max()) for n in ema)

    # 3: teacher session vs plain models. Warm the caches with an online forward first.
    x = batch.latents
    t = torch.tensor([0.9, 0.6, 0.3, 0.1])
    tt = torch.tensor([0.5, 0.6, 0.0, 0.05])
    with torch.no_grad():
        trainer.engine(x, t, tt, batch.cond)
        with trainer.teacher.session() as teacher_model:
            v_teacher = teacher_model(x, t, tt, batch.cond)
        v_online = trainer.engine(x, t, tt, batch.cond)
        plain_ema = plain_backbone(trainer.config, ema)
        plain_online = plain_backbone(trainer.config, online)
        results["teacher_vs_plain_ema"] = float((v_teacher - plain_ema(x, t, tt, batch.cond)).abs().max())
        results["online_after_session_vs_plain_online"] = float((v_online - plain_online(x, t, tt, batch.cond)).abs().max())
        results["velocity_scale"] = float(v_teacher.abs().max())
        # Negative control: without releasing the gathered (persistent) parameters the session would
        # run with the online weights.
        release = trainer.teacher._release_gathered
        trainer.teacher._release_gathered = lambda: None
        with trainer.teacher.session() as teacher_model:
            v_stale = teacher_model(x, t, tt, batch.cond)
        trainer.teacher._release_gathered = release
        results["no_release_vs_plain_ema"] = float((v_stale - plain_ema(x, t, tt, batch.cond)).abs().max())

    # 4: exports.
    ckpt = trainer.save_checkpoint()
    exported = {}
    for weights in ("ema", "online"):
        path = trainer.export(out / f"export_{weights}", weights=weights)
        if rank == 0:
            from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer

            loaded = TwinFlowQwenImageTransformer.from_pretrained(str(path)).state_dict()
            offline = export_checkpoint(ckpt, out / f"offline_{weights}", weights=weights)
            loaded_offline = TwinFlowQwenImageTransformer.from_pretrained(str(offline)).state_dict()
            expect = ema if weights == "ema" else online
            prefix = "transformer."
            exported[weights] = {
                "live": max(float((loaded[k[len(prefix):]] - v).abs().max()) for k, v in expect.items()),
                "offline": max(float((loaded_offline[k[len(prefix):]] - v).abs().max()) for k, v in expect.items()),
                "keys_match": sorted(loaded) == sorted(k[len(prefix):] for k in expect),
            }
    results["export"] = exported

    # 5: non-finite steps.
    before = {"master": [f.clone() for f in trainer.optimizer.fp32_partitioned_groups_flat],
              "ema": [e.clone() for e in trainer.teacher.ema],
              "lr_steps": trainer.scheduler.state_dict()["steps"],
              "ema_updates": trainer.teacher.schedule.num_updates}
    bad_step = trainer.state.step + 1
    trainer.config.faults.nonfinite_loss_steps = [bad_step]
    report = trainer.train_step()
    results["nonfinite"] = {
        "applied": report.applied,
        "skipped_steps": trainer.state.skipped_steps,
        "grad_norm_finite": math.isfinite(report.grad_norm),
        "master_unchanged": all(torch.equal(a, b) for a, b in zip(before["master"], trainer.optimizer.fp32_partitioned_groups_flat)),
        "ema_unchanged": all(torch.equal(a, b) for a, b in zip(before["ema"], trainer.teacher.ema)),
        "lr_steps_unchanged": trainer.scheduler.state_dict()["steps"] == before["lr_steps"],
        "ema_updates_unchanged": trainer.teacher.schedule.num_updates == before["ema_updates"],
    }
    report = trainer.train_step()  # a good step resets the run of skips
    results["nonfinite"]["next_applied"] = report.applied
    results["nonfinite"]["consecutive_after_good"] = trainer.state.consecutive_nonfinite
    trainer.config.train.max_consecutive_nonfinite = 2
    trainer.config.faults.nonfinite_loss_steps = [trainer.state.step + 1, trainer.state.step + 2]
    trainer.train_step()
    try:
        trainer.train_step()
        results["nonfinite"]["raised"] = None
    except NonFiniteTrainingError as e:
        results["nonfinite"]["raised"] = str(e)
    results["nonfinite"]["skipped_total"] = trainer.state.skipped_steps

    # 5b: a NaN in ONE rank's EMA shard: every rank refuses the save (one all-reduce agrees), the
    # rank that holds it names the tensor, and nothing is committed ('latest' keeps its checkpoint).
    from twinflow.training.checkpoint import CheckpointError

    checkpoints = out / "main" / "checkpoints"
    latest_before = (checkpoints / "latest").read_text()
    kept = trainer.teacher.ema[0].clone()
    if rank == 1:
        trainer.teacher.ema[0].view(-1)[0] = float("nan")
    try:
        trainer.save_checkpoint()
        error = None
    except CheckpointError as e:
        error = str(e)
    trainer.teacher.ema[0].copy_(kept)
    errors = [None] * trainer.dist.world_size
    dist.all_gather_object(errors, error)
    dist.barrier()
    results["nonfinite_save"] = {
        "errors": errors,
        "latest_unchanged": (checkpoints / "latest").read_text() == latest_before,
        "entries": sorted(p.name for p in checkpoints.iterdir()),
        "step": trainer.state.step,
    }
    trainer.close()

    results["lora"] = lora_checks(out, rank)
    results["gathers"] = gather_checks(out)

    # The reference straight run for the crash / kill / resume launches (same math as their config).
    straight = Trainer(load_train_config(CONFIG, [f"train.output_dir={out / 'straight'}", "train.save_every=2"]))
    results["optimizers"].update(lora=results["lora"].pop("optimizer"), straight=type(straight.optimizer.optimizer).__name__)
    straight.train()
    straight.close()

    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()

    # The same run again, dying in the middle of its save at step 4 (every rank exits with
    # SAVE_CRASH_EXIT_STATUS after writing its files): the first link of the test's crash / kill / resume chain.
    crashing = Trainer(load_train_config(CONFIG, [f"train.output_dir={out / 'chain'}", "train.save_every=2",
                                                  "faults.crash_in_save_at_step=4"]))
    crashing.train()
    raise AssertionError("the save at step 4 should have ended the process")


if __name__ == "__main__":
    main()
