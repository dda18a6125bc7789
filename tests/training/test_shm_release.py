"""DeepSpeed's CPU collectives leave a 66 MiB ``/dev/shm`` file per rank unless the rank unlinks it
(``distributed.release_cpu_shm_name``); a day of launches once filled 22 GiB of a 24 GiB machine."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import os, sys
from twinflow.training.distributed import SHM_BUFFER, init_distributed, shutdown_distributed
init_distributed()
name = SHM_BUFFER.format(uid=os.getuid(), addr=os.environ["MASTER_ADDR"], port=os.environ["MASTER_PORT"], rank=0)
print("exists" if os.path.exists(name) else "gone", flush=True)
shutdown_distributed()
"""


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this system")
def test_a_cpu_rank_leaves_no_shared_memory_file(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(port)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "gone"  # unlinked while the rank still runs
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
