"""The README's op examples run as written (on the CPU reference path)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_ops_and_modules_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    examples = [b for b in blocks if "from invnext import ops" in b or "from invnext import nn" in b]
    assert len(examples) == 2, "the README's ops and invnext.nn examples"
    namespace: dict = {}
    for block in examples:  # the second continues the first (x, hidden, C, ... carry over)
        exec(compile(block, "README.md", "exec"), namespace)
    B, T, H, W, C = (namespace[k] for k in ("B", "T", "H", "W", "C"))
    grid = namespace["grid"]
    assert grid.shape == (B, T * H * W, C) and torch.isfinite(grid).all()


MAIN_COMMAND = "bash scripts/setup.sh && .venv/bin/invnext pretrain --stage both --preset tiny"


def test_main_command_matches_the_preset_it_documents():
    """The README states what its main command trains; the preset that command loads must say the same."""
    from invnext.train.config import load_train_config

    assert MAIN_COMMAND in README, "the README's main command changed: update this test and the recipe it documents"
    recipe = re.search(
        r"Stage 1: (\d+) steps of (\d+) clips at lr ([0-9.e+-]+); Stage 2: (\d+) steps of (\d+) clips at lr "
        r"([0-9.e+-]+); (\d+) frames of (\d+) px in tokens of (\d+) frames x (\d+) x \d+ px, an encoder of width (\d+) "
        r"and (\d+) blocks",
        " ".join(README.split()),  # the sentence may wrap anywhere
    )
    assert recipe, "the README no longer states the main command's recipe in the form this test reads"
    s1_steps, s1_clips, s1_lr, s2_steps, s2_clips, s2_lr, frames, size, tubelet, patch, width, depth = recipe.groups()
    for stage, steps, clips, lr in ((1, s1_steps, s1_clips, s1_lr), (2, s2_steps, s2_clips, s2_lr)):
        cfg = load_train_config(stage, preset="tiny")  # what `--preset tiny` (no file, no --set) trains
        assert cfg.schedule.steps == int(steps), f"Stage {stage} steps"
        assert cfg.batch.global_size == int(clips), f"Stage {stage} clips per step"
        assert cfg.optim.lr == float(lr), f"Stage {stage} lr"
        enc = cfg.model_config().encoder
        stated = (int(frames), int(size), int(tubelet), int(patch), int(width), int(depth))
        got = (enc.num_frames, enc.img_size, enc.tubelet_size, enc.patch_size, enc.width, enc.depth)
        assert got == stated, f"Stage {stage} encoder"
    future = re.search(
        r"Stage 2 hides each clip's last (\d+) token steps? \(a future view\) from a predictor of (\d+) blocks that "
        r"attend(?:s)? within (\d+) x (\d+) x (\d+) token boxes",
        " ".join(README.split()),
    )
    assert future, "the README no longer states the main command's Stage-2 views in the form this test reads"
    hide_last, pred_depth, *box = (int(g) for g in future.groups())
    s2 = load_train_config(2, preset="tiny").model_config()
    assert [v.hide_last for v in s2.views] == [hide_last], "Stage 2 views"
    assert (s2.predictor.depth, s2.predictor.local_window_3d, s2.predictor.global_every) == (pred_depth, tuple(box), 0)


def test_longer_recipe_commands_are_valid_and_keep_the_whole_curve():
    """The README's longer recipe: its --set keys load, and the checkpoints it keeps span Stage 2."""
    import shlex

    from invnext.cli import _parser
    from invnext.train.config import load_train_config

    block = re.search(r"```bash\n(bash scripts/setup\.sh && [^`]*runs/tiny_long[^`]*)```", README)
    assert block, "the README's longer recipe block is gone: update this test"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    pretrain = shlex.split(lines[0].split("&&", 1)[1])[1:]
    evaluate = shlex.split(lines[1])[1:]
    args = _parser().parse_args(pretrain)
    assert (args.command, args.stage, args.preset, args.evaluate) == ("pretrain", "both", "tiny", "off")
    cfg = load_train_config(2, preset="tiny", sets=args.sets)
    assert cfg.schedule.steps == 4 * load_train_config(2, preset="tiny").schedule.steps  # "four times as long"
    assert cfg.save_every * cfg.keep_last >= cfg.schedule.steps, "the curve would lose its first checkpoints"
    ev = _parser().parse_args(evaluate)
    assert (ev.command, ev.run, ev.epochs, ev.lr, ev.curve) == ("evaluate", args.out, 100, 3e-3, True)
