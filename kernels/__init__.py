"""Triton kernels: folder ``kernels/``, imported as ``invnext_kernels`` (``kernels`` is Hugging Face's package).

``setup.py`` installs this folder as the top-level package ``invnext_kernels`` (the bare name
``kernels`` belongs to Hugging Face's PyPI package, which transformers imports); run from a
source checkout, ``invnext._kernels_path`` maps it to the same name at first use. Nothing
here is imported by ``import invnext``: ``invnext.ops`` loads a kernel module the first time
an op runs with ``backend="triton"`` (or ``"auto"`` on a CUDA tensor).

Run from the repository root (``python -m pytest``, ``python -m invnext``, ``torchrun -m
invnext``), the root is on ``sys.path`` and ``import kernels`` would find this folder before
site-packages. So when this file is executed *as* ``kernels``, it hands that name to the
installed package of that name, or fails as if this folder were not there.
"""
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _path = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder holds invnext's Triton "
            "kernels, imported as invnext_kernels)",
            name="kernels",
        )
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
