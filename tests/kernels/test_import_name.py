"""Our Triton folder is ``kernels/`` in the repository but installs as ``twinflow.kernels``; the top-level
name ``kernels`` belongs to Hugging Face's distribution, which transformers >= 5.25 imports eagerly from
``transformers.modeling_utils``. Every way of starting a process from the repository root puts the root
on ``sys.path``, where our folder would win; each entry point below runs ``twinflow env`` (which imports
``transformers.PreTrainedModel`` and ``twinflow.kernels``) as a user would start it, from the root, and
checks where both names resolved.

Entry points: ``python -m`` and ``deepspeed --module`` (what ``twinflow demo`` and ``twinflow train``
launch), the ``twinflow`` console script, ``python benchmarks/run_gpu.py`` (which puts the root on
``sys.path`` itself), a user's script saved in the root, and the pytest process itself, which has the
root on ``sys.path`` because ``benchmarks/`` is a package (the test at the bottom runs inside it). The
demo's own launches are covered end to end by ``tests/demo/test_demo_run.py``.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _check(report: dict) -> None:
    imports = report["imports"]
    assert imports["ok"], imports
    assert imports["twinflow_kernels_module"] == str(REPO_ROOT / "kernels" / "dual_time_embedding.py")
    top = imports["kernels_module"]
    if _hf_kernels_installed():
        assert top is not None and not Path(top).resolve().is_relative_to(REPO_ROOT / "kernels"), top
    else:
        assert top is None


def _run(cmd: list[str], *, env: dict | None = None, timeout: int = 300) -> dict:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-3000:]
    return json.loads(lines[-1])


def test_python_dash_m_from_the_root():
    report = _run([sys.executable, "-m", "twinflow.env", "--json"])
    assert report["imports"]["sys_path_0"] == str(REPO_ROOT)  # the premise: the root comes first
    _check(report)


def test_console_script_from_the_root():
    _check(_run([str(BIN / "twinflow"), "env", "--json"]))


def test_run_gpu_script_which_inserts_the_root():
    _check(_run([sys.executable, str(REPO_ROOT / "benchmarks" / "run_gpu.py"), "--env"]))


def test_a_users_script_saved_in_the_root():
    script = REPO_ROOT / f"_import_probe_{os.getpid()}.py"
    script.write_text("import sys\nfrom twinflow.env import main\nsys.exit(main(['--json']))\n")
    try:
        _check(_run([sys.executable, str(script)]))
    finally:
        script.unlink()


@pytest.mark.distributed
def test_deepspeed_module_launch_from_the_root():
    """One CPU rank through the real launcher, which also prepends the working directory to PYTHONPATH."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(port), "--no_local_rank",
           "--module", "twinflow.env", "--json"]
    _check(_run(cmd, env={"DS_ACCELERATOR": "cpu", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}))


def test_import_kernels_means_hugging_faces_distribution_in_this_process():
    """Under ``make test`` (``pytest tests benchmarks``) this process has the repository root on
    ``sys.path``, because ``benchmarks/`` is a package."""
    from transformers import PreTrainedModel  # noqa: F401

    import kernels

    if not _hf_kernels_installed():
        assert kernels.__file__ is None
        return

    assert not Path(kernels.__file__).resolve().is_relative_to(REPO_ROOT / "kernels")
    from kernels import CUDAProperties  # noqa: F401  (what transformers' hub integration imports)


def test_installed_package_does_not_claim_the_top_level_name(tmp_path):
    """Away from the repository root the install maps only ``twinflow.*``: the top-level name
    ``kernels`` is left to Hugging Face's distribution (located without importing anything)."""
    probe = ("import importlib.util, json; spec = importlib.util.find_spec; top = spec('kernels'); "
             "ours = spec('twinflow.kernels.dual_time_embedding'); "
             "print(json.dumps([top.origin if top else None, ours.origin, ours.name]))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top_origin, our_origin, our_name = json.loads(proc.stdout.strip().splitlines()[-1])
    assert top_origin is None or not Path(top_origin).resolve().is_relative_to(REPO_ROOT / "kernels")
    assert our_origin == str(REPO_ROOT / "kernels" / "dual_time_embedding.py")
    assert our_name == "twinflow.kernels.dual_time_embedding"


_WITHOUT_HF_KERNELS = """
import importlib.machinery, importlib.metadata, json, os, sys
# Hide Hugging Face's distribution, as on a machine with transformers < 5.25, which does not require it
# (the GPU image: transformers 5.17). Only the lookups outside the repository root are hidden.
root = os.getcwd()
find_spec = importlib.machinery.PathFinder.find_spec.__func__
def hidden(cls, name, path=None, target=None):
    if name == "kernels" and path is not None and all(os.path.abspath(p or os.curdir) != root for p in path):
        return None
    return find_spec(cls, name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(hidden)
version = importlib.metadata.version
def no_kernels(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return version(name)
importlib.metadata.version = no_kernels
sys.path.insert(0, root)
from transformers.utils.import_utils import _is_package_available
available = _is_package_available("kernels", return_version=True)
import kernels
try:
    from kernels import CUDAProperties
    error = None
except ImportError as e:
    error = str(e)
try:
    kernels.CUDAProperties
except AttributeError as e:
    attribute_error = str(e)
print(json.dumps({"available": list(available), "file": kernels.__file__, "error": error,
                  "attribute_error": attribute_error}))
"""


def test_without_hugging_faces_distribution_probes_read_absent():
    """transformers < 5.25 probes for ``kernels`` by finding it and, without a version in the metadata,
    importing it, unguarded (``utils/import_utils.py``, ``_is_package_available``): on the GPU image
    (transformers 5.17, no Hugging Face kernels) a raising module broke ``import diffusers.loaders.peft``
    in the end-to-end benchmark. The probe must read the name as absent, and ``from kernels import X``
    must fail with an ImportError (the attribute's error says why)."""
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_HF_KERNELS], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["available"] == [False, "N/A"]
    assert report["file"] is None
    assert report["error"].startswith("cannot import name 'CUDAProperties'"), report["error"]
    assert "twinflow.kernels" in report["attribute_error"], report["attribute_error"]
