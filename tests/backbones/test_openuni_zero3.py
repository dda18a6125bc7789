"""OpenUni under DeepSpeed ZeRO-3 (two CPU ranks over gloo; see ``openuni_zero3_worker.py``): the partitioned
queries, fed to the replicated and checkpointed LLM, get the gradients of an ordinary replica."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")


@pytest.mark.distributed
def test_partitioned_queries_through_the_frozen_llm_get_the_replicas_gradients(tmp_path):
    from twinflow.backbones.openuni.tiny_encoders import save_tiny_model_folder

    from twinflow.backbones.openuni.transformer import TwinFlowSanaTransformer

    folder = save_tiny_model_folder(tmp_path / "tiny")
    plain = tmp_path / "plain"  # as the conversion of the reference's checkpoint writes it: no time_embed_2
    TwinFlowSanaTransformer.from_pretrained(folder / "transformer", twin_embedder=False).save_pretrained(plain / "transformer")
    for name in ("internvl", "vae", "query_head"):
        (plain / name).symlink_to(folder / name, target_is_directory=True)
    worker = Path(__file__).with_name("openuni_zero3_worker.py")
    result = subprocess.run([sys.executable, str(worker), str(folder), str(plain)], capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0 and "ZERO3 OK" in result.stdout, result.stderr[-6000:]
