"""semantic_mask sampling time: the CUDA sampler against the torch reference (Stage 1, topk and sample).

    python -m benchmarks.bench_semantic_mask [--quick]

Inputs, timing and rows: benchmarks/cases_masks.py (its docstring says what is measured), shared by family.
"""
import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # run by path (python benchmarks/x.py): the repo root must be importable
from benchmarks.cases_masks import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("semantic_mask"))
