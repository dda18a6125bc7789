"""How a launched rank ends (``python -m twinflow.train``): main's exit code, everything printed still
reaches the pipe, and an unexpected error prints its traceback and ends with exit code 1. The rank skips
interpreter finalization (``os._exit``), so an ``atexit`` handler registered during the run does not run:
the test checks that too, since it is what keeps finalization's C++ teardown out of a finished run."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import atexit, sys
import twinflow.train as entry
atexit.register(lambda: print("finalized", flush=True))
def main():
    print("buffered line")          # no flush: the pipe is block-buffered
    print("to stderr", file=sys.stderr)
    {body}
entry.main = main
entry._launched()
"""


@pytest.mark.parametrize("body, code", [("return 0", 0), ("return 2", 2), ("1 / 0", 1),
                                        ("raise SystemExit(3)", 3)])
def test_launched_rank_exit(body, code):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "buffered line" in proc.stdout and "to stderr" in proc.stderr
    assert "finalized" not in proc.stdout
    assert ("ZeroDivisionError" in proc.stderr) == (body == "1 / 0")
