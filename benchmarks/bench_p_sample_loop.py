"""p_sample_loop: the CUDA-graph sampler against the eager reference loop, clips/s.

    python -m benchmarks.bench_p_sample_loop [--quick]

Inputs, timing and rows: benchmarks/cases_diffusion.py (its docstring says what is measured), shared by family.
"""
import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # run by path (python benchmarks/x.py): the repo root must be importable
from benchmarks.cases_diffusion import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("p_sample_loop"))
