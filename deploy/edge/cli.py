"""``fedyolo export`` and ``fedyolo bench``: the edge pipeline's commands.

Registered in the ``fedyolo.commands`` entry-point group (``pyproject.toml``). An export exits
0 for an accepted bundle and 1 (``ExitCode.FAILED``) with one line why for a rejected one; a
file or setting that cannot be used is an ``EdgeError`` (a ``UserError``: one line, exit 2). A bench
whose model a runtime could not run measures and writes the others, names it with the reason
(a table row, ``failed`` in bench.json, one line on stderr) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deploy.edge import EdgeError, settings
from fl_client.errors import ExitCode, existing
from fl_server.cli import setup_logging


def export_command(parser: argparse.ArgumentParser) -> None:
    """an edge bundle from a checkpoint (configs/edge/export.yaml: key=value)"""
    parser.add_argument(
        "model", help="a .pt checkpoint (e.g. runs/<name>/best.pt); with --check, a bundle"
    )
    parser.add_argument("overrides", nargs="*", help="e.g. quantize=8 imgsz=320")
    parser.add_argument(
        "--check", action="store_true", help="re-run the gates of an existing bundle"
    )
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> ExitCode:
    from deploy.edge import export  # torch and Ultralytics: when the command runs, not at --help

    cfg = settings.load("export", args.overrides)
    setup_logging()
    if args.check:
        bundle = Path(args.model)
        existing(bundle / "model.json")  # a bundle, else one line naming what is missing
        report = export.check(bundle, cfg)
        meta = json.loads((bundle / "model.json").read_text())  # as check() updated it
    else:
        meta = export.export(Path(args.model), cfg)
        bundle = Path(meta["bundle"])
        report = json.loads((bundle / "gates.json").read_text())
    acc = next((c for c in report["checks"] if c["gate"] == "accuracy"), None)
    figures = "not gated"
    if acc:
        figures = (
            f"held-out mAP50-95 {acc['export_map50_95']:.4f} "
            f"(checkpoint {acc['checkpoint_map50_95']:.4f})"
        )
    if not report["passed"]:
        print(f"fedyolo: {export.verdict_line(report, bundle / meta['file'])}", file=sys.stderr)
        print(f"bundle {bundle} marked rejected; see {bundle / 'gates.json'}", file=sys.stderr)
        return ExitCode.FAILED
    print(
        f"{meta['variant']}: {bundle / meta['file']} ({meta['size_bytes'] / 1e6:.1f} MB), "
        f"gates passed: {figures}"
    )
    return ExitCode.OK


def bench_command(parser: argparse.ArgumentParser) -> None:
    """latency, memory, size and mAP of models (configs/edge/bench.yaml: key=value)"""
    parser.add_argument(
        "items", nargs="+", help="models (.pt, .onnx, bundle folders), then key=value"
    )
    parser.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> ExitCode:
    models = [i for i in args.items if "=" not in i]
    cfg = settings.load("bench", [i for i in args.items if "=" in i])
    if not models:
        raise EdgeError("bench: give at least one model (.pt, .onnx or bundle folder)")
    setup_logging()
    from deploy.edge import bench  # torch and ONNX Runtime: when the command runs, not at --help

    report = bench.bench([Path(m) for m in models], cfg)
    print(bench.table(report["results"], report["failed"]), end="")
    print(f"written: {report['out']}/bench.json, bench.md, bench.png")
    for f in report["failed"]:  # the others were measured and written; this one could not run
        print(f"fedyolo: {f['error']}", file=sys.stderr)
    return ExitCode.FAILED if report["failed"] else ExitCode.OK
