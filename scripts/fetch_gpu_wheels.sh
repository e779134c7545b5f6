#!/usr/bin/env bash
# Download the optional benchmark baselines the GPU machine lacks (it has no internet) into .whl/
# (git-ignored), as wheels for its Python 3.12 / x86-64. Run here, then hand .whl to the device
# tool's `carry`; scripts/gpu_check.sh installs whatever it finds there into /tmp/site.
#   xformers 0.0.35: 3 MB, built on torch's stable ABI (torch >= 2.10), the BlockDiagonalMask baseline
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "xformers==0.0.35"
ls -la .whl
