"""A diffusion-decoder train step (D6 W1536, bf16): fused Triton ops against eager torch, TFLOP/s.

    python -m benchmarks.bench_decoder_train_step [--quick]

Inputs, timing and rows: benchmarks/cases_diffusion.py (its docstring says what is measured), shared by family.
"""
import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # run by path (python benchmarks/x.py): the repo root must be importable
from benchmarks.cases_diffusion import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("decoder_train_step"))
