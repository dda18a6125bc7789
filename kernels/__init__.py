"""Fused Triton kernels, each beside its eager reference. Installed as ``twinflow.kernels``.

The top-level name ``kernels`` belongs to Hugging Face's distribution, which transformers (>= 5.25)
imports eagerly. Whenever the repository root is on ``sys.path`` (``python -m`` or ``deepspeed
--module`` started there, pytest collecting ``benchmarks/``, a script saved there), this folder is
found first under that name. The block below then hands the import over to Hugging Face's package,
or, where that is not installed, leaves an empty module that availability probes read as absent, so
``import kernels`` means the same thing from any working directory. None of our code runs under the top-level name.

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
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
    else:
        # Hugging Face's distribution is not installed (transformers < 5.25 does not require it). Our
        # folder is still *found* under the name, and transformers' availability probe then imports it to
        # read a version, unguarded. So this module stays, empty, and looks like what such probes skip: a
        # namespace-package shadow with no file and no version. ``from kernels import X`` fails with an
        # ImportError that says why.
        __file__ = None
        __path__ = []

        def __getattr__(name: str):
            raise AttributeError(
                f"'kernels' has no attribute {name!r}: Hugging Face's kernels distribution is not installed, "
                "and the repository's kernels/ folder is importable only as twinflow.kernels")
