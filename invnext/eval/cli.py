"""``invnext probe``, ``invnext evaluate`` and ``invnext reconstruct``: their argument parsers and entry points.

Only argparse is imported here: :mod:`invnext.cli` builds these parsers on every invocation,
and the heavy modules load when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys

_PROBE_EPILOG = """\
examples:
  invnext probe --encoder runs/tiny/stage2/model.safetensors --protocol attentive
      every label of the bundled default dataset (its train.csv / val.csv), features cached
  invnext probe --encoder teacher:default --protocol linear --label dynamics
      the bundled image teacher, frame features averaged: a no-motion baseline
  invnext probe --encoder base --train k400_train.csv --val k400_val.csv --views 2x3 --frames 16
      the release's presets / checkpoints / the authors' files all work (see invnext.loading)

outputs (in --out): probe_<protocol>.json (settings, feature provenance, top-1/top-5 per label)
and confusion_<protocol>_<label>.png. Features are cached in --cache keyed by the encoder's
weights, the index file (bytes + mtime) and frames/size/views: a rerun with other probe
settings does not re-encode.
"""

_EVALUATE_EPILOG = """\
examples:
  invnext evaluate runs/tiny --epochs 100 --lr 3e-3
      the default run's table with a probe trained to fit its train clips (the default probe under-fits)
  invnext evaluate runs/tiny_long --epochs 100 --lr 3e-3 --curve
      the same, and the curve over the run's kept Stage-2 checkpoints (README, the longer recipe)

outputs (in --out): table.md, table.json, per-source probe folders; with --curve, curve.png and
curve.json. Features are cached as `invnext probe` caches them.
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``probe``, ``evaluate`` and ``reconstruct`` subcommands to ``sub``."""
    p = sub.add_parser(
        "probe",
        help="evaluate a frozen encoder with an attentive or linear probe",
        description="Train a probe on a frozen encoder's features of a labelled train index and report top-1 "
        "(and top-5, with more than 5 classes) on a val index, averaging logits over multi-view clips.",
        epilog=_PROBE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--encoder",
        required=True,
        metavar="SOURCE",
        help="a preset (tiny, base, large, 1b), one of our checkpoints (a .safetensors file, a stage or "
        "checkpoint folder), the authors' released encoder, or teacher:default",
    )
    p.add_argument(
        "--train",
        default=None,
        metavar="INDEX",
        help="labelled train index (CSV / JSONL); default: the bundled dataset's",
    )
    p.add_argument(
        "--val", default=None, metavar="INDEX", help="labelled val index (CSV / JSONL); default: the bundled dataset's"
    )
    p.add_argument(
        "--protocol",
        choices=("attentive", "linear"),
        default="attentive",
        help="attentive: cross-attention pooling + linear over the tokens; linear: linear on the pooled embedding",
    )
    p.add_argument(
        "--label",
        action="append",
        default=None,
        metavar="NAME",
        help="label column to probe (repeatable; default: every label column)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="probe training epochs (default: 20 attentive, 50 linear, raised to make >= 300 steps)",
    )
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 1e-3)")
    p.add_argument(
        "--weight-decay", type=float, default=None, help="AdamW weight decay (default: 0.05 attentive, 1e-4 linear)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="probe training batch (default 64)")
    p.add_argument(
        "--heads", type=int, default=None, help="attentive probe heads (default: up to 16 with head dim >= 8)"
    )
    p.add_argument(
        "--views", default="1x1", metavar="CLIPSxCROPS", help="val views, logits averaged (e.g. 2x3; default 1x1)"
    )
    p.add_argument(
        "--train-views", default="1x1", metavar="CLIPSxCROPS", help="train views, each a sample (default 1x1)"
    )
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the encoder's)")
    p.add_argument("--size", type=int, default=None, help="clip side in pixels (default: the encoder's)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/probe/<protocol>)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache", default=None, metavar="DIR", help="feature cache folder (default: ~/.cache/invnext/features)"
    )
    cache.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="feature extraction precision")
    p.add_argument("--extract-batch-size", type=int, default=8, help="clips per encoder forward (default 8)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding (default 0)")
    p.add_argument("--seed", type=int, default=0, help="probe init and batch order (default 0)")

    e = sub.add_parser(
        "evaluate",
        help="probe a finished run's encoders (and its checkpoints over steps) with chosen probe settings",
        description="The table that ends `invnext pretrain --stage both` (random encoder, image teacher, Stage 1, "
        "Stage 2; attentive and linear probes on the bundled dataset's labels), for a run folder RUN, with "
        "the probe settings given here. --curve also probes every kept Stage-2 checkpoint and the Stage-1 "
        "start (step 0) and draws the learning curve.",
        epilog=_EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("run", metavar="RUN", help="a run folder holding stage1/ and stage2/ (trained on the bundled data)")
    e.add_argument(
        "--data-root", default=None, metavar="DIR",
        help="the bundled dataset variant the run trained on (its data.default_root; default: the cache's)",
    )
    e.add_argument("--epochs", type=int, default=None, help="probe epochs (default: as `invnext probe`)")
    e.add_argument("--lr", type=float, default=None, help="probe peak learning rate (default: as `invnext probe`)")
    e.add_argument("--curve", action="store_true", help="also probe each kept Stage-2 checkpoint (attentive)")
    e.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/eval-<epochs>ep-lr<lr>)")
    e.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    e.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    e.add_argument("--seed", type=int, default=0, help="random encoder, probe init and batch order (default 0)")

    r = sub.add_parser(
        "reconstruct",
        help="show what a Stage-1 model's diffusion decoder draws for the hidden patches of a clip",
        description="Mask a clip of VIDEO (Stage 1's semantic mask when a teacher is available, else a tube mask), "
        "run the encoder, predictor and diffusion sampler, and write a PNG grid: rows original / masked / "
        "reconstructed, one column per frame.",
    )
    r.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="a Stage-1 model.safetensors, checkpoint folder or stage folder",
    )
    r.add_argument("--video", required=True, metavar="FILE", help="the video to reconstruct")
    r.add_argument("--steps", type=int, default=50, help="respaced diffusion sampling steps (default 50)")
    r.add_argument("--temperature", type=float, default=1.0, help="sampler noise temperature (default 1.0)")
    r.add_argument("--frames", type=int, default=None, help="frames of the clip (default: the encoder's)")
    r.add_argument(
        "--out",
        default=None,
        metavar="PNG",
        help="output image (default: <video stem>_reconstruction.png beside the video)",
    )
    r.add_argument("--mask", choices=("auto", "semantic", "tube"), default="auto", help="mask kind (default auto)")
    r.add_argument(
        "--teacher",
        default="auto",
        metavar="auto|default|none|FILE",
        help="where the semantic mask's teacher comes from",
    )
    r.add_argument("--seed", type=int, default=0, help="mask and sampler noise seed (default 0)")
    r.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    r.add_argument(
        "--no-clip", dest="clip_x0", action="store_false",
        help="do not clip each step's predicted clean patch to the pixel range (sample exactly as trained)",
    )


def _options(args: argparse.Namespace, *names: str) -> dict:
    """The named parsed options, passed on under the same names (each flag's dest is its keyword)."""
    return {name: getattr(args, name) for name in names}


def _probe(args: argparse.Namespace) -> int:
    from invnext.eval.probe import ProbeConfig, run_probe

    label = args.label[0] if args.label and len(args.label) == 1 else args.label
    config = ProbeConfig(
        label=label,
        **_options(
            args, "protocol", "epochs", "lr", "weight_decay", "batch_size", "heads", "views", "train_views",
            "frames", "size", "precision", "extract_batch_size", "workers", "seed",
        ),
    )
    res = run_probe(
        args.encoder,
        args.train,
        args.val,
        config,
        out=args.out if args.out is not None else f"runs/probe/{args.protocol}",
        cache=False if args.no_cache else (args.cache if args.cache is not None else True),
        device=args.device,
    )
    print(f"results: {res['json']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from invnext.eval.curve import plot_curve, probe_checkpoints
    from invnext.eval.table import evaluate_run, format_table

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN {run_dir} is not a folder")
    out = Path(args.out) if args.out is not None else run_dir / f"eval-{args.epochs or 'default'}ep-lr{args.lr or 'default'}"
    probe = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed, "device": args.device, "cache": not args.no_cache}
    data = {}
    if args.data_root is not None:
        from invnext.eval.sources import TeacherSource
        from invnext.teacher_pretrain import load_default_teacher

        root = Path(args.data_root)
        teacher = TeacherSource(load_default_teacher(root), name=f"teacher of {root}")
        data = {"train": root / "train.csv", "val": root / "val.csv", "teacher": teacher}
    result = evaluate_run(run_dir, eval_dir=out, **data, **probe)
    print(format_table(result), flush=True)
    print(f"table: {result['files']['markdown']}")
    if args.curve:
        index = {k: v for k, v in data.items() if k in ("train", "val")}
        # The table probed the Stage-1 start and the final Stage-2 weights with these settings already.
        known = {r["attentive"]["fingerprint"]: r["attentive"] for r in result["probes"].values()}
        curve = probe_checkpoints(
            run_dir / "stage2", start=run_dir / "stage1" / "model.safetensors", known=known, **index, **probe
        )
        baselines = {r["name"]: r for r in result["rows"][:2]}  # the random encoder and the image teacher
        png = plot_curve(curve, out / "curve.png", baselines, title=f"Stage 2 of {run_dir}: attentive probe")
        print(f"curve: {png} and {png.with_suffix('.json')}")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from invnext.eval.reconstruct import reconstruct

    res = reconstruct(
        args.checkpoint,
        args.video,
        **_options(args, "steps", "temperature", "frames", "out", "mask", "teacher", "seed", "device", "clip_x0"),
    )
    summary = {k: res[k] for k in ("png", "mask", "teacher", "hidden_fraction", "psnr_hidden", "clip_x0", "image_shape")}
    print(json.dumps(summary, indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``probe`` / ``evaluate`` / ``reconstruct``; a bad argument or input file prints one line and returns 2."""
    try:
        return {"probe": _probe, "evaluate": _evaluate, "reconstruct": _reconstruct}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"invnext {args.command}: error: {exc}", file=sys.stderr)
        return 2
