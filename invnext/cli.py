"""The ``invnext`` command line (also ``python -m invnext``).

Commands: ``doctor`` (what can run here), ``pretrain`` (Stage 1 / Stage 2 pretraining, one
process or under ``torchrun``), ``data check INDEX`` (decode-check every clip of an index).
Heavy modules are imported only by the command that needs them.
"""
from __future__ import annotations

import argparse
import sys

_PRETRAIN_EPILOG = """\
examples:
  invnext pretrain --stage both --preset tiny
      both stages on the bundled default dataset (generated on first use), results in runs/tiny/
  invnext pretrain --stage 1 --config configs/stage1_tiny.yaml --set optim.lr=1e-4 --set schedule.steps=50
  invnext pretrain --stage 2 --config configs/stage2_tiny.yaml --init runs/tiny/stage1
  invnext pretrain --stage both --preset tiny --out runs/tiny --resume     continue a killed run exactly
  torchrun --nproc_per_node 8 -m invnext pretrain --stage 1 --config configs/stage1_base.yaml

outputs (per stage, in OUT/stage1 and OUT/stage2):
  model.safetensors   final weights        checkpoints/   step_NNNNNNNN/ folders + 'latest'
  metrics.jsonl       logged steps         tb/            TensorBoard events (if installed)
  losses.png          loss curves          summary.json   the end-of-stage summary

--set keys (dotted; a 'stage1.' / 'stage2.' prefix reaches one stage only):
  schedule.{steps,epochs,warmup_steps,warmup_epochs,min_lr}
  optim.{lr,betas,eps,weight_decay,grad_clip}
  batch.{global_size,per_device,accumulation}
  data.{source,frames,size,workers,synthetic_clips,default_root,default_clips,default_teacher_steps}
  monitor.{min_std,min_erank_frac}    model.preset    model.overrides.<any Stage1Config/Stage2Config key>
  teacher  init  seed  save_every  keep_last  log_every  max_skipped_steps
  precision (auto|bf16|fp32)  device (auto|cpu|cuda)  strategy (auto|ddp|fsdp)  progress  tensorboard  threads
  ops_backend (auto|torch|triton|cuda; torch = the plain-PyTorch baseline)  grad_checkpointing  compile
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="invnext", description="InternVideo-Next pretraining and fused video-model ops.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    doc = sub.add_parser(
        "doctor",
        help="show versions, the device, and which backend can run each op here (and why not)",
        description="Print torch/triton/CUDA versions, the device, and for every op which backends are "
        "available on this machine; a missing backend comes with the reason.",
    )
    doc.add_argument("--device", default=None, help="device to check the backends for (default: cuda if visible, else cpu)")
    doc.add_argument(
        "--selftest",
        action="store_true",
        help="also run every kernel available on the device against its reference on small inputs (seconds); "
        "exit status 1 if one disagrees",
    )

    pre = sub.add_parser(
        "pretrain",
        help="pretrain an encoder: Stage 1 (pixel diffusion + teacher alignment), Stage 2 (frozen-target prediction) or both",
        description="Pretrain InternVideo-Next. Without a data option it trains on the bundled default dataset "
        "(generated on first use, never downloaded) with its default teacher. Every config is checked before "
        "training starts: an unknown key is an error naming it. Under torchrun it trains data-parallel "
        "(DDP, or FSDP2 for large/1b) with the same results as one process at the same global batch.",
        epilog=_PRETRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pre.add_argument("--stage", required=True, choices=("1", "2", "both"), help="which stage(s) to run; 'both' runs Stage 1, then Stage 2 from its result")
    src = pre.add_mutually_exclusive_group()
    src.add_argument(
        "--config", action="append", default=[], metavar="FILE",
        help="a stage config (YAML, TOML or JSON) holding 'stage: 1' or 'stage: 2'; give one per stage run "
        "(twice with --stage both). See configs/stage1_tiny.yaml for every key",
    )
    src.add_argument("--preset", default=None, metavar="NAME", help="model preset and its default recipe: tiny, base, large, 1b (default: tiny)")
    pre.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=1e-4 --set stage2.schedule.steps=50 "
        "(VALUE is read as YAML; repeatable; keys listed below)",
    )
    pre.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/<preset or config name>)")
    pre.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its latest complete checkpoint (finished stages are skipped); "
        "without it an --out that already holds a run is an error",
    )
    pre.add_argument(
        "--init", default=None, metavar="CKPT",
        help="Stage 2 only: the Stage-1 result to start from (a stage folder, a checkpoint folder or a "
        "model.safetensors); --stage both uses OUT/stage1 automatically",
    )

    pre.add_argument(
        "--eval", dest="evaluate", default="auto", choices=("auto", "on", "off"),
        help="end a --stage both run with attentive probes of a random encoder, the image teacher and both "
        "stages' encoders, plus a reconstruction picture, in OUT/eval/ (auto: on when the run trained on the "
        "bundled default dataset, whose labels the probes need)",
    )

    data = sub.add_parser("data", help="dataset tools", description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    check = data_sub.add_parser(
        "check", help="decode every clip of an index and report the unreadable ones",
        description="Open and decode every clip of INDEX (a CSV / JSONL index or a folder of videos) over its whole "
        "window and list the files a training run would skip, with the reason. Exit status: 0 all clips readable, "
        "1 some are not, 2 the index itself is unusable.",
    )
    check.add_argument("index", metavar="INDEX", help="a .csv / .jsonl index or a folder of videos")
    check.add_argument("--decoder", default="pyav", choices=("pyav", "torchcodec", "decord"), help="video decoder (default: pyav)")
    _add_probe_parsers(sub)
    return p


def _add_probe_parsers(sub: argparse._SubParsersAction) -> None:
    """``probe``, ``evaluate`` and ``reconstruct`` (parsers and entry points in :mod:`invnext.eval.cli`)."""
    from invnext.eval.cli import add_parsers

    add_parsers(sub)


def _pretrain(args: argparse.Namespace) -> int:
    from invnext.train.checkpoint import CheckpointWriteError, OutputLockedError
    from invnext.train.loop import FaultHooks, NonFiniteLossError, RunExistsError, UsageError
    from invnext.train.run import pretrain, resolve_configs

    try:  # every config is checked before anything is built
        resolve_configs(args.stage, args.config, args.preset, args.sets)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        print(f"invnext pretrain: config error: {exc}", file=sys.stderr)
        return 2
    try:
        pretrain(
            args.stage, configs=args.config, preset=args.preset, sets=args.sets, out=args.out,
            resume=args.resume, init=args.init, hooks=FaultHooks.from_env(), evaluate=args.evaluate,
        )
    except (UsageError, RunExistsError, NonFiniteLossError, OutputLockedError, CheckpointWriteError) as exc:
        print(f"invnext pretrain: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from invnext.doctor import run_doctor

        rc = run_doctor(args.device)
        if args.selftest:
            import torch

            from invnext.selftest import print_selftest

            rc = max(rc, print_selftest(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        return rc
    if args.command == "pretrain":
        return _pretrain(args)
    if args.command == "data":
        if args.data_command == "check":
            from invnext.data.check import run_data_check

            return run_data_check(args.index, decoder=args.decoder)
        parser.parse_args(["data", "--help"])
    if args.command in ("probe", "evaluate", "reconstruct"):
        from invnext.eval.cli import run

        return run(args)
    parser.print_help(sys.stderr)
    return 2
