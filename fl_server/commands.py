"""The commands ``fl_server`` owns: ``run``, ``distill``, ``data`` and ``clearml-import``.

Each ``*_command(parser)`` is registered in the ``fedyolo.commands`` entry-point group
(``pyproject.toml``); ``fl_server.cli`` calls it with the command's parser, and it adds its
arguments and ``set_defaults(handler=...)``. Nothing here imports torch, Ultralytics or Hydra or
composes a config until a handler runs, so ``fedyolo --help`` stays fast. A handler returns an
``ExitCode``; a user's mistake raises a ``UserError`` (one line, from ``fl_server.cli.main``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from fl_client.errors import ExitCode, existing
from fl_server import api, config, data, plugins
from fl_server.cli import setup_logging
from fl_server.records import Status
from fl_server.run_dir import RunDir
from fl_server.tracking import import_offline


def run_command(parser: argparse.ArgumentParser) -> None:
    """run one federation (Hydra overrides: key=value ...)"""
    parser.add_argument("overrides", nargs="*", help="e.g. federation.clients=4 train.epochs=2")
    parser.add_argument(
        "--from",
        dest="from_file",
        help="a yaml list of overrides applied before the others (e.g. a study's best.yaml)",
    )
    plugins.add_flag(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> ExitCode:
    return run_federation([*overrides_file(args.from_file), *args.overrides])


def run_federation(overrides: list[str]) -> ExitCode:
    """``fedyolo run``: ``fl_server.run`` plus what a person reads at the end."""
    cfg = config.compose(overrides)  # a bad value stops here, before any work
    setup_logging(str(cfg.log_level))
    t0 = time.perf_counter()
    summary = api.run(cfg)
    run = summary.run_dir
    if summary.status == Status.STOPPED:
        print(
            f"fedyolo: run {run} was stopped by the drift guard after repeated rollbacks; "
            f"best.pt holds the best model; see {RunDir(run).events}",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    if summary.status != Status.COMPLETED:
        why = f": {summary.reason}" if summary.reason else f"; see {RunDir(run).events}"
        print(f"fedyolo: run {run} ended with status {summary.status}{why}", file=sys.stderr)
        return ExitCode.FAILED
    best, final = summary.best, summary.final
    print(
        f"\nDone in {time.perf_counter() - t0:.0f} s: {summary.rounds_completed} rounds"
        + (
            f", {summary.rounds_lost} of them lost (no client update; see events.jsonl)"
            if summary.rounds_lost
            else ""
        )
        + ".\n"
        f"  final mAP50-95 {final.map50_95:.3f} (mAP50 {final.map50:.3f}) on the "
        f"server's held-out set\n"
        f"  best  mAP50-95 {best.map50_95:.3f} at round {best.round} → {summary.best_checkpoint}\n"
        f"  results: {run} (summary.md, metrics.jsonl, metrics.png)"
    )
    return ExitCode.OK


def overrides_file(path: str | None) -> list[str]:
    """The overrides in a yaml list file (``--from``); ConfigError names a bad file."""
    if not path:
        return []
    try:
        items = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise config.ConfigError(f"--from {path}: cannot read it ({type(e).__name__})") from e
    if not isinstance(items, list) or not all(isinstance(o, str) and "=" in o for o in items):
        raise config.ConfigError(f"--from {path}: expected a yaml list of key=value overrides")
    return items


def distill_command(parser: argparse.ArgumentParser) -> None:
    """train a student federatedly with a run's best.pt as its teacher (same data)"""
    parser.add_argument("run", help="the teacher's run directory, runs/<name>")
    parser.add_argument(
        "items", nargs="+", help="student=<model yaml>, then key=value on that run's config"
    )
    plugins.add_flag(parser)
    parser.set_defaults(handler=_distill)


def _distill(args: argparse.Namespace) -> ExitCode:
    students = [i.split("=", 1)[1] for i in args.items if i.startswith("student=")]
    if len(students) != 1:
        raise config.ConfigError("distill: give the student once, e.g. student=yolov8n.yaml")
    setup_logging()
    existing(RunDir(Path(args.run)).summary)  # the teacher is a finished run
    teacher = api.Summary.read(Path(args.run))
    overrides = [i for i in args.items if not i.startswith("student=")]
    summary = api.distill(args.run, students[0], overrides)
    if summary.status != Status.COMPLETED:
        print(f"fedyolo: {summary.run_dir} ended with status {summary.status}", file=sys.stderr)
        return ExitCode.FAILED
    print(
        f"student {students[0]}: best mAP50-95 {summary.best.map50_95:.3f} "
        f"(round {summary.best.round}) on the same held-out set as its teacher's "
        f"{teacher.best.map50_95:.3f} → {summary.best_checkpoint}"
    )
    return ExitCode.OK


def clearml_import_command(parser: argparse.ArgumentParser) -> None:
    """import a run's offline ClearML session(s) into the server"""
    parser.add_argument("run", help="the run directory, runs/<name>")
    parser.set_defaults(handler=_clearml_import)


def _clearml_import(args: argparse.Namespace) -> ExitCode:
    setup_logging()
    task_id = import_offline(RunDir(Path(args.run)))
    print(f"imported {args.run} as ClearML task {task_id}")
    return ExitCode.OK


def data_command(parser: argparse.ArgumentParser) -> None:
    """synthetic data, partitions, checks"""
    sub = parser.add_subparsers(dest="data_cmd", required=True)
    # option defaults left None come from the run's config (configs/), composed when one runs
    s = sub.add_parser("synth", help="generate the synthetic driving fleet (YOLO format)")
    s.add_argument("out")
    s.add_argument("--images", type=int)
    s.add_argument("--imgsz", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--domains", help="comma list of day,dusk,night,fog,rain,blur")
    s.set_defaults(handler=_synth)
    pa = sub.add_parser("partition", help="split a dataset into client shards")
    pa.add_argument("data", help="data.yaml, Roboflow export folder or COCO json")
    pa.add_argument("out")
    pa.add_argument("--clients", type=int, required=True)
    pa.add_argument("--method", choices=list(data.METHODS))
    pa.add_argument("--alpha", type=float)
    pa.add_argument("--seed", type=int)
    pa.add_argument("--server-val-fraction", type=float)
    pa.add_argument("--client-val-fraction", type=float)
    pa.set_defaults(handler=_partition)
    c = sub.add_parser("check", help="list bad images and labels (exit 3 if any)")
    c.add_argument("path")
    c.add_argument("--report", help="write the report as JSON here")
    c.add_argument("--work-dir", help="write repaired label copies here")
    c.set_defaults(handler=_check)


def _config_defaults(args: argparse.Namespace) -> None:
    """The data options the user left out, from the run's config: defaults live once."""
    cfg = config.compose()
    synth = cfg.data.synth
    defaults = {
        "images": int(synth.images),
        "imgsz": int(synth.imgsz),
        "seed": int(cfg.seed),
        "domains": ",".join(synth.domains),
        "method": cfg.data.partition,
        "alpha": float(cfg.data.alpha),
        "server_val_fraction": cfg.data.server_val_fraction,
        "client_val_fraction": cfg.data.client_val_fraction,
    }
    for key, value in defaults.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)


def _synth(args: argparse.Namespace) -> ExitCode:
    _config_defaults(args)
    setup_logging()
    t0 = time.perf_counter()
    domains = [d for d in args.domains.split(",") if d]
    path = data.generate(
        Path(args.out), args.images, imgsz=args.imgsz, seed=args.seed, domains=domains
    )
    print(f"{args.images} images in {time.perf_counter() - t0:.1f} s → {path}")
    return ExitCode.OK


def _partition(args: argparse.Namespace) -> ExitCode:
    _config_defaults(args)
    setup_logging()
    ds = data.load_dataset(Path(args.data))
    out = Path(args.out)
    report = data.check_dataset(ds, work_dir=out / "repaired_labels")
    part = data.partition(
        report.usable,
        args.clients,
        method=args.method,
        alpha=args.alpha,
        seed=args.seed,
        server_val_fraction=args.server_val_fraction,
        client_val_fraction=args.client_val_fraction,
    )
    manifest = data.write_partition(part, list(ds.names), out)
    m = json.loads(Path(manifest).read_text())
    for c in m["clients"]:
        print(
            f"client {c['id']}: {c['train_images']} train, {c['val_images']} val, "
            f"classes {c['class_counts']}"
        )
    print(
        f"server_val: {m['server_val']['images']} images; data version "
        f"{m['data_version'][:12]}; manifest {manifest}"
    )
    return ExitCode.OK


def _check(args: argparse.Namespace) -> ExitCode:
    setup_logging()
    ds = data.load_dataset(Path(args.path))
    report = data.check_dataset(
        ds,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        repair=args.work_dir is not None,
    )
    print(report.summary())
    if args.report:
        report.write(Path(args.report))
        print(f"report: {args.report}")
    return ExitCode.ISSUES_FOUND if report.issues else ExitCode.OK
