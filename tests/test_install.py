"""The repository root must not shadow installed packages.

``python -m pytest``, ``python -m invnext`` and ``torchrun -m invnext`` put the repository root
first on ``sys.path``, so every importable name at the root (the ``kernels/`` folder among them)
competes with site-packages. transformers 5.x imports Hugging Face's ``kernels`` package; a root
folder that shadowed it broke every transformers model import from the root. These tests run
in subprocesses started in the repository root, as a user's command would be.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _root_import_names() -> list[str]:
    names = []
    for entry in ROOT.iterdir():
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.append(entry.name)
        elif entry.suffix == ".py":
            names.append(entry.stem)
    return sorted(names)


def test_transformers_model_builds_from_the_repository_root_with_hf_kernels_installed():
    # `kernels` is in the test extra, so this runs wherever the README's test command ran.
    assert importlib.metadata.distribution("kernels"), "Hugging Face's kernels package is not installed"
    proc = _run_in_root(
        """
        import kernels
        from transformers import SiglipVisionConfig, SiglipVisionModel
        config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=16, patch_size=8)
        SiglipVisionModel(config)
        print(kernels.__file__)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    assert found != ROOT / "kernels" / "__init__.py", "`import kernels` from the root found the repository's folder"


def test_no_root_name_shadows_an_installed_distribution():
    # The next package that claims a name we keep at the root (benchmarks, setup, ...) fails here.
    provided = importlib.metadata.packages_distributions()
    clashes = [n for n in _root_import_names() if n in provided and set(provided[n]) != {"invnext"}]
    assert "kernels" in clashes  # this test must at least see the known one
    proc = _run_in_root(
        f"""
        import importlib, os
        for name in {clashes!r}:
            module = importlib.import_module(name)
            print(name, os.path.realpath(module.__file__))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.strip().splitlines():
        name, path = line.split(" ", 1)
        mine = {ROOT / name / "__init__.py", ROOT / f"{name}.py"}
        assert Path(path) not in mine, f"`import {name}` from the root found {path}, not the installed package"


def test_kernels_folder_hands_its_name_to_another_package_on_the_path(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("WHO = 'the installed one'\n")
    (fake / "sub.py").write_text("X = 3\n")
    proc = _run_in_root(
        f"""
        import sys
        sys.path[:] = [{str(ROOT)!r}, {str(tmp_path)!r}] + [p for p in sys.path if 'site-packages' not in p and p]
        import kernels, kernels.sub
        print(kernels.WHO, kernels.sub.X)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "the installed one 3"


def test_kernels_folder_is_not_importable_as_kernels_when_nothing_else_is():
    proc = _run_in_root(
        f"""
        import sys
        sys.path[:] = [{str(ROOT)!r}] + [p for p in sys.path if 'site-packages' not in p and p]
        try:
            import kernels
        except ModuleNotFoundError as exc:
            print("missing", exc.name)
        else:
            print("imported", kernels.__file__)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "missing kernels"


@pytest.mark.parametrize("name", ["invnext_kernels", "invnext_kernels.attention"])
def test_triton_layer_imports_as_invnext_kernels_from_the_root(name):
    proc = _run_in_root(f"import importlib, os; m = importlib.import_module({name!r}); print(os.path.realpath(m.__file__))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).resolve().parent == ROOT / "kernels"


def _in_the_setup_venv() -> bool:
    return Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


def test_setup_puts_timm_beside_the_kept_torch_for_the_tests_only():
    # scripts/setup.sh installs timm and the torchvision of the installed torch into .venv/test-site;
    # the next timm or torchvision release that breaks that, or a setup that lets pip swap torch,
    # fails here rather than as skipped timm tests.
    if not _in_the_setup_venv():
        pytest.skip(f"runs in the .venv that scripts/setup.sh makes; this is {sys.prefix}")
    import timm
    import torchvision

    assert Path(timm.__file__).resolve().is_relative_to((ROOT / ".venv" / "test-site").resolve())
    torch_version = importlib.metadata.version("torch")
    torch_minor = int(torch_version.split(".")[1])
    assert torchvision.__version__.startswith(f"0.{torch_minor + 15}."), (torchvision.__version__, torch_version)
    assert timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8)


def test_the_venv_without_the_tests_path_sees_no_torchvision_that_breaks_transformers():
    if not _in_the_setup_venv():
        pytest.skip(f"runs in the .venv that scripts/setup.sh makes; this is {sys.prefix}")
    proc = _run_in_root("from transformers import VideoMAEModel, VideoMAEConfig; print(VideoMAEModel.__name__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
