"""The backbone under DeepSpeed ZeRO-3 (two CPU ranks over gloo; see ``qwen_zero3_worker.py``).

One subprocess covers every ZeRO-3 check, so the start-up (imports, rank spawn) is paid once.
"""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")


@pytest.mark.distributed
def test_zero3_partitioned_backbone_matches_unpartitioned_and_trains():
    worker = Path(__file__).with_name("qwen_zero3_worker.py")
    result = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0 and "ZERO3 OK" in result.stdout, result.stderr[-6000:]
