"""A pretrained diffusers checkpoint loaded into a ZeRO-3 partitioned model (how the trainer starts from
Qwen-Image): every parameter equals the checkpoint, time_text_embed_2 is filled from time_text_embed,
and a checkpoint that does not fit is an error naming the key. One ZeRO-3 rank in a subprocess, so the
test process's torch.distributed state stays untouched."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from twinflow.backbones.qwen_image.pretrained_loading import load_checkpoint_into
from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer
from twinflow.utils.typed_config import ConfigError

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, deepspeed
    from twinflow.backbones.qwen_image.build import build_qwen_image_backbone
    from twinflow.backbones.qwen_image.config import QwenImageBackboneConfig
    from twinflow.utils.partitioned import gathered
    from safetensors.torch import load_file
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    from twinflow.training.distributed import release_cpu_shm_name

    release_cpu_shm_name()  # DeepSpeed leaves its /dev/shm workspace otherwise
    folder = sys.argv[1]
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        bb = build_qwen_image_backbone(QwenImageBackboneConfig(pretrained=folder, dtype="float32"), "cpu")
    saved = load_file(folder + "/diffusion_pytorch_model.safetensors")
    params = dict(bb.transformer.named_parameters())
    partitioned = all(hasattr(p, "ds_id") for p in params.values())
    worst = 0.0
    with gathered(params.values()):
        for name, p in params.items():
            key = name if name in saved else name.replace("time_text_embed_2.", "time_text_embed.", 1)
            worst = max(worst, (p.detach() - saved[key]).abs().max().item())
    # a checkpoint that does not fit a partitioned model fails before any gather (every rank alike)
    from twinflow.backbones.qwen_image.pretrained_loading import load_checkpoint_into
    from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
    from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer
    from twinflow.utils.typed_config import ConfigError
    with deepspeed.zero.Init(config_dict_or_path=ds):
        wider = TwinFlowQwenImageTransformer(**{**tiny_transformer_config(), "joint_attention_dim": 48})
    try:
        load_checkpoint_into(wider, folder, twin_embedder=True)
        mismatch = "no error"
    except ConfigError as e:
        mismatch = str(e)
    print(json.dumps({"partitioned": partitioned, "worst": worst, "n": len(params), "mismatch": mismatch}))
    """
)


@pytest.fixture
def plain_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**tiny_transformer_config())
    model.save_pretrained(tmp_path / "plain")
    return tmp_path / "plain"


@pytest.mark.distributed
def test_partitioned_model_equals_the_checkpoint(plain_checkpoint, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([sys.executable, str(script), str(plain_checkpoint), str(port)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["partitioned"] and result["worst"] == 0.0
    assert result["mismatch"].endswith("txt_norm.weight has shape (32,), the model's txt_norm.weight has (48,)")  # full shape, not the shard
    assert result["n"] == len(dict(TwinFlowQwenImageTransformer(**tiny_transformer_config()).named_parameters()))


def test_unpartitioned_load_and_errors(plain_checkpoint):
    model = TwinFlowQwenImageTransformer(**tiny_transformer_config())
    load_checkpoint_into(model, plain_checkpoint, twin_embedder=True)
    reference = TwinFlowQwenImageTransformer.from_pretrained(str(plain_checkpoint))
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
    wider = TwinFlowQwenImageTransformer(**{**tiny_transformer_config(), "joint_attention_dim": 48})
    with pytest.raises(ConfigError, match="has shape"):
        load_checkpoint_into(wider, plain_checkpoint, twin_embedder=True)
    deeper = TwinFlowQwenImageTransformer(**{**tiny_transformer_config(), "num_layers": 3})
    with pytest.raises(ConfigError, match=r"missing \['transformer_blocks.2"):
        load_checkpoint_into(deeper, plain_checkpoint, twin_embedder=True)
    with pytest.raises(ConfigError, match="holds neither"):
        load_checkpoint_into(model, plain_checkpoint.parent, twin_embedder=True)
