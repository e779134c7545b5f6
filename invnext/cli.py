"""The ``invnext`` command line (also ``python -m invnext``)."""
from __future__ import annotations

import argparse
import sys


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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from invnext.doctor import run_doctor

        return run_doctor(args.device)
    parser.print_help(sys.stderr)
    return 2
