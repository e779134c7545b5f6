"""scatter_tokens bandwidth (forward, backward) against eager PyTorch, Stage-1 and Stage-2 shapes.

    python -m benchmarks.bench_scatter_tokens [--quick]

Inputs, timing and rows: benchmarks/cases_tokens.py (its docstring says what is measured), shared by family.
"""
import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # run by path (python benchmarks/x.py): the repo root must be importable
from benchmarks.cases_tokens import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("scatter_tokens"))
