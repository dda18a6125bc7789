"""Our Triton folder is ``kernels/`` in the repository but installs as ``twinflow.kernels``: the
top-level name ``kernels`` belongs to Hugging Face's distribution, which diffusers uses for hub
attention backends. These checks run in subprocesses so that ``sys.path`` is exactly what a user gets:
from the repository root (where the folder *is* importable as ``kernels``) and from elsewhere."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_PROBE = textwrap.dedent('''
    import importlib.metadata, importlib.util, json, os, sys
    import torch
    import diffusers.utils
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
    import twinflow.kernels
    import twinflow.kernels.dual_time_embedding as dte

    try:
        importlib.metadata.version("kernels")
        hf_kernels_installed = True
    except importlib.metadata.PackageNotFoundError:
        hf_kernels_installed = False

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 16) for _ in range(3))  # (batch, seq, heads, head_dim)
    out = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.NATIVE)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    spec = importlib.util.find_spec("kernels")
    print(json.dumps({
        "cwd_on_path": os.getcwd() in [os.path.abspath(p or ".") for p in sys.path],
        "top_level_origin": spec.origin if spec else None,
        "hf_kernels_installed": hf_kernels_installed,
        "is_kernels_available": diffusers.utils.is_kernels_available(),
        "attention_max_diff": (out - sdpa).abs().max().item(),
        "package_file": twinflow.kernels.__file__,
        "module_name": dte.__name__,
        "module_file": dte.__file__,
        "top_level_imported": "kernels" in sys.modules,
    }))
''')


def _probe(cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_repo_root_folder_does_not_shadow_anything():
    got = _probe(REPO_ROOT)
    # The premise: from the repository root, our folder is visible under the top-level name.
    assert got["cwd_on_path"]
    assert got["top_level_origin"] == str(REPO_ROOT / "kernels" / "__init__.py")
    # diffusers reports Hugging Face's distribution only, never our folder.
    assert got["is_kernels_available"] == got["hf_kernels_installed"]
    # Attention dispatch (which would reach for `kernels` on hub backends) still works.
    assert got["attention_max_diff"] <= 1e-6
    # Our package resolves under its installed name, and nothing imported the top-level name.
    assert got["package_file"] == str(REPO_ROOT / "kernels" / "__init__.py")
    assert got["module_name"] == "twinflow.kernels.dual_time_embedding"
    assert got["module_file"] == str(REPO_ROOT / "kernels" / "dual_time_embedding.py")
    assert not got["top_level_imported"]


def test_installed_package_does_not_claim_the_top_level_name(tmp_path):
    """Away from the repository root the editable install maps only ``twinflow.*``: the top-level
    name ``kernels`` is left to Hugging Face's distribution (located without importing anything)."""
    probe = ("import importlib.util, json; spec = importlib.util.find_spec; top = spec('kernels'); "
             "ours = spec('twinflow.kernels.dual_time_embedding'); "
             "print(json.dumps([top.origin if top else None, ours.origin, ours.name]))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top_origin, our_origin, our_name = json.loads(proc.stdout.strip().splitlines()[-1])
    assert top_origin is None or not top_origin.startswith(str(REPO_ROOT))
    assert our_origin == str(REPO_ROOT / "kernels" / "dual_time_embedding.py")
    assert our_name == "twinflow.kernels.dual_time_embedding"
