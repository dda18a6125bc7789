"""Two CPU ranks over gloo: OpenUni under ZeRO-3 with every parameter partitioned (persistence threshold 0).

Run by ``test_openuni_zero3.py`` as ``python openuni_zero3_worker.py <tiny folder> <plain tiny folder>`` (it
spawns its own ranks); the second check builds the LoRA recipes' single-embedder model from the plain folder.
The learnable queries are a partitioned parameter read inside the query head's forward and fed to the frozen,
replicated, gradient-checkpointed LLM. Each step runs a no-grad pass, the pass with gradients, a release of every
gathered parameter (as entering a teacher session does), another no-grad pass and the backward, inside the
trainer's per-step trace (``StepTrace``); rank 1's prompts repeat, so the ranks send different numbers of
distinct rows through the LLM. The gradients ZeRO-3 reduces for the queries, the connector and the projector
must equal those of an ordinary replica fed both ranks' rows (float32; the bound 1e-5 relative is ~100 float32
ulps, room for the different summation order of the reduce-scatter and the replica's two backwards). Exits
non-zero on failure.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

WORLD = 2
ROWS = 4
NAMES = ["query_head.meta_queries", "query_head.connector.layers.0.self_attn.q_proj.weight", "query_head.projector.weight",
         "sana.time_embed_2.linear.weight"]


def ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": ROWS, "gradient_accumulation_steps": 1, "train_batch_size": ROWS * WORLD,
            "gradient_clipping": 0.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_prefetch_bucket_size": 2000, "stage3_max_live_parameters": 10000}}


def batch(step: int, rank: int):
    from twinflow.backbones.openuni.condition import OpenUniPrompt

    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(5, 50, (ROWS, 7), generator=g)
    mask = torch.ones(ROWS, 7, dtype=torch.bool)
    mask[0, 5:] = False
    if rank == 1:  # repeated prompts: fewer distinct rows through the LLM on this rank
        ids[2:], mask[2:] = ids[1], mask[1]
    x = torch.randn(ROWS, 4, 2, 2, generator=g)
    t = torch.rand(ROWS, generator=g)
    return x, t, t * torch.rand(ROWS, generator=g), OpenUniPrompt(ids, mask)


def check(folder: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from twinflow.backbones.openuni.build import build_openuni_backbone
    from twinflow.backbones.openuni.config import OpenUniBackboneConfig
    from twinflow.training.zero_trace import StepTrace

    rank = torch.distributed.get_rank()
    config = OpenUniBackboneConfig(pretrained=folder, dtype="float32", gradient_checkpointing=True)
    with deepspeed.zero.Init(config_dict_or_path=ds_config()):
        backbone = build_openuni_backbone(config, "cpu")
    queries = backbone.transformer.query_head.meta_queries
    assert queries.numel() == 0 and queries.ds_numel > 0, "the queries must be partitioned for this check"
    engine, optimizer, _, _ = deepspeed.initialize(model=backbone, config=ds_config(),
                                                   model_parameters=[p for p in backbone.parameters() if p.requires_grad])
    trace = StepTrace(engine)
    replica = build_openuni_backbone(config, "cpu")
    worst = 0.0
    for step in range(4):  # steps 3 and 4 replay a complete trace (prefetching)
        params = dict(engine.module.transformer.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())), torch.no_grad():
            for name, p in replica.transformer.named_parameters():
                p.copy_(params[name])
        x, t, tt, cond = batch(step, rank)
        with trace.step():
            with torch.no_grad():
                engine(x, t, tt, cond)
            out = engine(x, t, tt, cond)
            optimizer.empty_partition_cache()
            with torch.no_grad():
                engine(x, t, tt, cond)
            engine.backward(out.float().square().mean())
        got = {name: safe_get_full_grad(params[name]) for name in NAMES}
        engine.step()
        replica.zero_grad()
        for r in range(WORLD):
            xr, tr, ttr, cr = batch(step, r)
            (replica(xr, tr, ttr, cr).float().square().mean() / WORLD).backward()
        expected = dict(replica.transformer.named_parameters())
        for name in NAMES:
            reference = expected[name].grad
            assert reference.abs().max() > 0, f"{name}: no gradient reached it"
            worst = max(worst, ((got[name] - reference).abs().max() / reference.abs().max()).item())
    assert worst < 1e-5, f"ZeRO-3 gradients differ from the replica's: worst relative error {worst:.2e}"


def check_lora_single_embedder(folder: str) -> None:
    """The shipped LoRA recipes' model (``twin_embedder: false``, the head frozen) from a plain SANA folder (a
    converted reference checkpoint has no ``time_embed_2``), built under ``zero.Init``: it trains its adapters
    only, and the EMA adapter is there."""
    import deepspeed

    from twinflow.backbones.openuni.build import build_openuni_backbone
    from twinflow.backbones.openuni.config import LoraSettings, OpenUniBackboneConfig

    config = OpenUniBackboneConfig(pretrained=folder, dtype="float32", twin_embedder=False, train_query_head=False,
                                   lora=LoraSettings(enabled=True, rank=2, alpha=2.0))
    with deepspeed.zero.Init(config_dict_or_path=ds_config()):
        backbone = build_openuni_backbone(config, "cpu")
    assert not hasattr(backbone.transformer.sana, "time_embed_2")
    trained = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and ".default." in n for n in trained), sorted(trained)[:4]
    assert any(".ema." in n for n, _ in backbone.named_parameters())
    engine, _, _, _ = deepspeed.initialize(model=backbone, config=ds_config(),
                                           model_parameters=[p for p in backbone.parameters() if p.requires_grad])
    x, t, tt, cond = batch(0, torch.distributed.get_rank())
    engine.backward(engine(x, t, tt, cond).float().square().mean())
    engine.step()
    assert engine.was_step_applied()


def checks(folder: str, plain_folder: str) -> None:
    check(folder)
    check_lora_single_embedder(plain_folder)


if __name__ == "__main__":
    from zero3_ranks import run_ranks

    run_ranks(checks, sys.argv[1], sys.argv[2])
