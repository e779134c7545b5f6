#!/usr/bin/env bash
# Set up invnext in ./.venv on any machine: the one setup step behind both README commands.
#
# - The venv sees the system's site-packages, so a torch that is already installed (GPU
#   machines ship their own) is kept and used.
# - With no torch anywhere: a CPU machine gets torch==2.13.0 (the CPU build); only a machine
#   with an NVIDIA GPU gets pip's default (CUDA) torch. A multi-GB CUDA torch never lands on
#   a CPU machine.
# - The CUDA extension is built only where a GPU is visible (or INVNEXT_SKIP_CUDA_BUILD=0);
#   elsewhere the package installs without it and says so in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif [ "$has_gpu" = 1 ]; then
  echo "setup: no torch found; installing pip's default (CUDA) torch for this GPU machine"
  pip_install torch
else
  echo "setup: no torch found; installing the CPU build torch==2.13.0"
  pip_install torch==2.13.0
fi

if [ -z "${INVNEXT_SKIP_CUDA_BUILD:-}" ]; then
  if [ "$has_gpu" = 1 ]; then export INVNEXT_SKIP_CUDA_BUILD=0; else export INVNEXT_SKIP_CUDA_BUILD=1; fi
fi
pip_install -e ".[test]"

# timm, for the tests of invnext.integrations.timm, goes into .venv/test-site, which only the tests put
# on their path (tests/conftest.py), with the torchvision that matches the kept torch (0.(minor+15)).
# Not into .venv itself: pip would take the newest torchvision and replace torch to suit it, and on
# x86_64 PyPI's torchvision is built against the CUDA torch, so beside a CPU torch its C++ ops don't
# load and `import transformers` then fails for anything in the venv.
torch_minor=$("$PY" -c 'import torch; print(torch.__version__.split(".")[1])')
if ! compgen -G ".venv/test-site/timm-*.dist-info" >/dev/null || ! compgen -G ".venv/test-site/torchvision-*.dist-info" >/dev/null; then
  pip_install --no-deps --upgrade --target .venv/test-site "timm>=1.0" "torchvision==0.$((torch_minor + 15)).*" ||
    echo "setup: timm or a torchvision for this torch is not installable; the timm integration's tests will fail"
fi
"$PY" -c "import invnext, invnext.ops; print('setup: invnext', invnext.__version__, 'ready in .venv')"
