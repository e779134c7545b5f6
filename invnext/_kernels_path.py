"""Map folder ``kernels/`` to package ``invnext_kernels`` (the name ``kernels`` is Hugging Face's package).

The repository keeps the Triton kernels in ``kernels/`` (the layout users asked for);
installed, that folder is the top-level package ``invnext_kernels`` (``setup.py`` maps
it), a name no other PyPI project uses. Run from a source checkout without installing,
this maps the folder to the same name so imports work the same way.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "invnext_kernels"


def ensure_kernels_importable() -> bool:
    if _NAME in sys.modules:
        return True
    try:
        if importlib.util.find_spec(_NAME) is not None:
            return True
    except (ImportError, ValueError):
        pass
    folder = Path(__file__).resolve().parent.parent / "kernels"
    init = folder / "__init__.py"
    if not init.is_file():
        return False
    spec = importlib.util.spec_from_file_location(_NAME, init, submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    return True
