"""Build and install invnext.

Packages: ``invnext`` (all subpackages) and the Triton layer, the repository folder
``kernels/`` installed as the top-level package ``invnext_kernels``.

The CUDA extension ``invnext.native._C`` (csrc/, built with CMake) is optional. It is built when
``nvcc`` (on PATH or under CUDA_HOME) and ``cmake`` are found and ``INVNEXT_SKIP_CUDA_BUILD``
is not "1"; otherwise, or when its build fails, invnext installs without it and prints one line
saying why (the Triton and PyTorch backends still work, and invnext.native can compile the
same kernels at run time through CuPy). ``INVNEXT_FORCE_CUDA_BUILD=1`` turns any of those
into an error. Installing never needs a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SKIP_ENV = "INVNEXT_SKIP_CUDA_BUILD"
FORCE_ENV = "INVNEXT_FORCE_CUDA_BUILD"
FALLBACK = "installing without the CUDA extension (Triton and PyTorch backends only)"


def find_nvcc(env=os.environ, which=shutil.which) -> str | None:
    """nvcc on PATH, else under $CUDA_HOME (or $CUDA_PATH)."""
    found = which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home:
            candidate = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return None


def cuda_build_plan(env=os.environ, which=shutil.which) -> tuple[str | None, str | None]:
    """``(nvcc, None)`` to build the extension, or ``(None, reason)`` to install without it."""
    if env.get(SKIP_ENV, "") == "1":
        return None, f"{SKIP_ENV}=1"
    nvcc = find_nvcc(env, which)
    if nvcc is None:
        return None, "nvcc not found"
    if which("cmake") is None:
        return None, "cmake not found"
    return nvcc, None


def skip_message(reason: str) -> str:
    return f"invnext: {reason}; {FALLBACK}"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class BuildExt(build_ext):
    """Builds the CMake extension, or leaves it out with one line saying why."""

    def run(self) -> None:
        force = os.environ.get(FORCE_ENV, "") == "1"
        nvcc, reason = cuda_build_plan()
        if reason is None:
            try:
                for ext in self.extensions:
                    self._build_cmake(ext, nvcc)
                return
            except (OSError, subprocess.CalledProcessError) as exc:
                reason = f"the CUDA extension failed to build ({exc})"
        if force:
            raise RuntimeError(f"invnext: {FORCE_ENV}=1 but {reason}")
        print(skip_message(reason), flush=True)
        self.extensions = []  # nothing to install or to list as an output

    def _build_cmake(self, ext: Extension, nvcc: str) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DINVNEXT_MODULE_DIR={target.parent}",
        ]  # fmt: skip
        if shutil.which("ninja") and not (build_dir / "Makefile").exists():
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        if not target.exists():
            built = sorted(target.parent.glob("_C*.so"))
            if not built:
                raise OSError(f"CMake produced no _C module in {target.parent}")
            built[0].replace(target)


class BuildPy(build_py):
    """Also ships the NVRTC-compatible kernel headers beside invnext.native for the run-time CuPy path."""

    HEADERS = ("token_kernels.cuh", "mask_kernels.cuh", "philox.cuh")

    def run(self) -> None:
        super().run()
        for name in self.HEADERS:
            src = ROOT / "csrc" / name
            if src.is_file():
                dst = Path(self.build_lib) / "invnext" / "native" / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(src), str(dst))


def _version() -> str:
    text = (ROOT / "invnext" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def _packages() -> list[str]:
    kernels = ["invnext_kernels"] + [f"invnext_kernels.{p}" for p in find_packages(where="kernels")]
    return find_packages(include=["invnext", "invnext.*"]) + kernels


if __name__ == "__main__":
    setup(
        name="invnext",
        version=_version(),
        description="Fast, dependable pretraining of InternVideo-Next video encoders (Triton + CUDA kernels)",
        python_requires=">=3.10",
        packages=_packages(),
        package_dir={"invnext_kernels": "kernels"},
        ext_modules=[CMakeExtension("invnext.native._C")],
        cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
        install_requires=[
            "numpy",
            "torch>=2.4",
            'triton>=3.2; platform_system=="Linux"',
            "safetensors",
            "pyyaml",
            "av",  # PyAV: video decoding and the bundled dataset's mp4 files
            "scikit-learn",  # ships the digit images the bundled dataset is made from
            "matplotlib",  # loss curves, confusion matrices, reconstruction grids
            "tensorboard",
        ],
        extras_require={
            # kernels: Hugging Face's package that transformers 5.x imports; tests/test_install.py checks that
            # the repository's kernels/ folder does not shadow it when run from the root.
            # transformers>=5.0: invnext.integrations.transformers uses its attention and mask registries.
            "test": ["pytest", "pytest-benchmark", "transformers>=5.0", "kernels"],
            # timm imports torchvision, which must match torch; pip would rather replace the installed
            # torch to suit the newest torchvision. scripts/setup.sh therefore installs timm and the
            # matching torchvision for the tests into .venv/test-site itself (it says why).
            "timm": ["timm>=1.0"],
        },
        entry_points={"console_scripts": ["invnext = invnext.cli:main"]},
        zip_safe=False,
    )
