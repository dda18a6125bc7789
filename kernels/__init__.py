"""Fused Triton kernels, each beside its eager reference. Installed as ``twinflow.kernels``.

The top-level name ``kernels`` belongs to Hugging Face's distribution, which transformers (>= 5.25)
imports eagerly. Whenever the repository root is on ``sys.path`` (``python -m`` or ``deepspeed
--module`` started there, pytest collecting ``benchmarks/``, a script saved there), this folder is
found first under that name. The block below then hands the import over to Hugging Face's package
(or fails as if this folder were not there), so ``import kernels`` means the same thing from any
working directory. None of our code runs under the top-level name.

Why not simply drop this file and leave a namespace folder, which regular packages outrank: the
editable install (``pip install -e``) maps ``twinflow.kernels`` onto this folder only when it is a
regular package.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(
            "No module named 'kernels' (Hugging Face's distribution is not installed; the repository's "
            "kernels/ folder is importable only as twinflow.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
