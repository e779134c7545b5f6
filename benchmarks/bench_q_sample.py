"""q_sample bandwidth (Triton against the eager reference), bf16 and fp32, at the Stage-1 decoder shape.

    python -m benchmarks.bench_q_sample [--quick] [--sweep]

Inputs, timing and rows: benchmarks/cases_diffusion.py (its docstring says what is measured), shared by family.
"""
import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # run by path (python benchmarks/x.py): the repo root must be importable
from benchmarks.cases_diffusion import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("q_sample"))
