"""The user docs' examples run as written (docs/ops.md, docs/integrations.md), on the CPU.

Each file's ```python blocks run in order in one namespace (later blocks use earlier names). A
block that imports a framework that is not importable here is skipped with the reason (timm needs
a torchvision matching torch); the blocks after it still run.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), re.S)


@pytest.mark.parametrize("name", ["ops.md", "integrations.md"])
def test_doc_examples_run(name, capsys):
    blocks = _blocks(name)
    assert blocks, f"docs/{name} has no python examples"
    namespace: dict = {}
    skipped = []
    for i, block in enumerate(blocks):
        frameworks = re.findall(r"^import (timm|transformers)\b|^from (timm|transformers)\b", block, re.M)
        missing = [f for pair in frameworks for f in pair if f and _missing(f)]
        if missing:
            skipped.append((i, missing))
            continue
        exec(compile(block, f"docs/{name} block {i}", "exec"), namespace)
    if name == "integrations.md":
        assert namespace["loss"].ndim == 0 and namespace["context_out"].tokens.shape[1] == 96
        if "vis" in namespace:  # the timm block ran
            assert namespace["vis"].prefix().shape == (2, 5, 64)
    if name == "ops.md":
        assert "backend='auto' runs 'torch'" in capsys.readouterr().out
    if skipped:
        pytest.skip(f"ran the other blocks; skipped {skipped}: framework not importable here")


def _missing(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return True
    return False
