#!/usr/bin/env bash
# Compile and link the CUDA extension (csrc/ -> invnext.native._C) with CMake and nvcc, warnings
# as errors, so CI fails when the CUDA code does not build. Nothing is run: the build machine
# needs nvcc, not a GPU.
#
#   bash scripts/build_csrc.sh            # build into build/csrc
#   bash scripts/build_csrc.sh --inplace  # also copy the module into invnext/native/ (source-tree use;
#                                         # --install is the same)
#
# Environment: PYTHON, the Python whose pybind11 the bindings use (default: the project's .venv when
# scripts/setup.sh made one, else python3, else python), BUILD_DIR (default: build/csrc), JOBS (default: 2).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${BUILD_DIR:-$root/build/csrc}"
jobs="${JOBS:-2}"
if [ -n "${PYTHON:-}" ]; then python="$PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"
else python="$(command -v python3 || command -v python)"; fi
# CMake resolves a relative interpreter path from its build folder: make it absolute here.
case "$python" in */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;; *) python="$(command -v "$python")" ;; esac
inplace=0
for arg in "$@"; do
  case "$arg" in
    --inplace | --install) inplace=1 ;;
    *) echo "build_csrc.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

if ! command -v nvcc >/dev/null 2>&1 && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export PATH="$CUDA_HOME/bin:$PATH"
fi
command -v nvcc >/dev/null 2>&1 || { echo "build_csrc.sh: nvcc not found (PATH or CUDA_HOME)" >&2; exit 1; }
command -v cmake >/dev/null 2>&1 || { echo "build_csrc.sh: cmake not found" >&2; exit 1; }
"$python" -c "import pybind11" 2>/dev/null \
  || { echo "build_csrc.sh: no pybind11 for $python (run: $python -m pip install 'pybind11>=2.12', or set PYTHON)" >&2; exit 1; }

# Ninja compiles the bindings alongside the kernels (make waits for the library first).
generator=()
if command -v ninja >/dev/null 2>&1 && [ ! -f "$build_dir/Makefile" ]; then generator=(-G Ninja); fi

start=$(date +%s)
cmake -S "$root" -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DINVNEXT_WERROR=ON \
  -DPython_EXECUTABLE="$python" -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >/dev/null
cmake --build "$build_dir" -j "$jobs"
module="$(find "$build_dir" -maxdepth 1 -name '_C*.so' | head -n 1)"
[ -n "$module" ] || { echo "build_csrc.sh: the build produced no _C module" >&2; exit 1; }
if [ "$inplace" = 1 ]; then
  cp "$module" "$root/invnext/native/"
  echo "build_csrc.sh: copied $(basename "$module") into invnext/native/"
fi
echo "build_csrc.sh: built $(basename "$module") in $(( $(date +%s) - start ))s"
