"""The README's op examples run as written (on the CPU reference path)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_ops_and_modules_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    examples = [b for b in blocks if "from invnext import ops" in b or "from invnext import nn" in b]
    assert len(examples) == 2, "the README's ops and invnext.nn examples"
    namespace: dict = {}
    for block in examples:  # the second continues the first (x, hidden, C, ... carry over)
        exec(compile(block, "README.md", "exec"), namespace)
    B, T, H, W, C = (namespace[k] for k in ("B", "T", "H", "W", "C"))
    grid = namespace["grid"]
    assert grid.shape == (B, T * H * W, C) and torch.isfinite(grid).all()
