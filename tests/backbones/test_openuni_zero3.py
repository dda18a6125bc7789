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

    folder = save_tiny_model_folder(tmp_path / "tiny")
    worker = Path(__file__).with_name("openuni_zero3_worker.py")
    result = subprocess.run([sys.executable, str(worker), str(folder)], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0 and "ZERO3 OK" in result.stdout, result.stderr[-6000:]
