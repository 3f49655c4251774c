"""The ``fedyolo`` command line.

    fedyolo run [overrides...]             one federation; writes runs/<name>/
    fedyolo data synth OUT [options]       generate the synthetic driving fleet
    fedyolo data partition DATA OUT ...    split a dataset into client shards + server val set
    fedyolo data check PATH                report (and list) bad images and labels
    fedyolo tune [overrides...]            an Optuna study of federations; writes runs/<study>/
    fedyolo distill RUN student=YAML [k=v]  a small student taught by RUN's best.pt, federatedly
    fedyolo export MODEL.pt [key=value...]  a gated edge bundle (ONNX fp32/fp16/int8, TensorRT)
    fedyolo export BUNDLE --check          re-run an edge bundle's gates
    fedyolo bench MODEL... [key=value...]  latency, memory, size and held-out mAP of models
    fedyolo clearml-import runs/<name>     upload a run's offline ClearML session to a server
    fedyolo deploy images [--offline]      build the server and client container images
    fedyolo deploy aws plan|up|push|status|scale N|down [key=value...]   EC2 Auto Scaling
    fedyolo deploy certs OUT --clients N   a CA, a SuperLink certificate, one key pair per client

A user's mistake ends with one line naming the thing; a bug still raises.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
from pathlib import Path

import fl_server.api  # noqa: F401 - sets the offline/telemetry environment before any import

LOGGER = logging.getLogger("fedyolo")
# OSErrors a user meets and can act on, said in one line (any other is a bug: it raises)
USER_OS_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from ultralytics.utils import LOGGER as UL_LOGGER

    UL_LOGGER.setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines


def cmd_run(overrides: list[str]) -> int:
    """``fedyolo run``: ``fl_server.run`` plus what a person reads at the end."""
    from fl_server import api
    from fl_server import config as config_mod

    cfg = config_mod.compose(overrides)  # a bad value stops here, before any work
    _setup_logging(str(cfg.log_level))
    t0 = time.perf_counter()
    summary = api.run(cfg)
    run = summary.run_dir
    if summary.status == "stopped":
        print(
            f"fedyolo: run {run} was stopped by the drift guard after repeated rollbacks; "
            f"best.pt holds the best model; see {run / 'events.jsonl'}",
            file=sys.stderr,
        )
        return 1
    if summary.status != "completed":
        why = f": {summary.reason}" if summary.reason else f"; see {run / 'events.jsonl'}"
        print(f"fedyolo: run {run} ended with status {summary.status}{why}", file=sys.stderr)
        return 1
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
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from fl_client import data

    _setup_logging()
    if args.data_cmd == "synth":
        t0 = time.perf_counter()
        domains = [d for d in args.domains.split(",") if d]
        path = data.generate(
            Path(args.out), args.images, imgsz=args.imgsz, seed=args.seed, domains=domains
        )
        print(f"{args.images} images in {time.perf_counter() - t0:.1f} s → {path}")
    elif args.data_cmd == "partition":
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
    elif args.data_cmd == "check":
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
        return 0 if not report.issues else 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fl_server import plugins

    p = argparse.ArgumentParser(prog="fedyolo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one federation (Hydra overrides: key=value ...)")
    run.add_argument("overrides", nargs="*", help="e.g. federation.clients=4 train.epochs=2")
    run.add_argument(
        "--from",
        dest="from_file",
        help="a yaml list of overrides applied before the others (e.g. a study's best.yaml)",
    )
    plugins.add_flag(run)
    tune = sub.add_parser(
        "tune", help="an Optuna study whose trials are federations (tuning.* and base overrides)"
    )
    tune.add_argument("overrides", nargs="*", help="e.g. tuning.trials=20 federation.clients=4")
    plugins.add_flag(tune)
    di = sub.add_parser(
        "distill",
        help="train a student federatedly with a run's best.pt as its teacher (same data)",
    )
    di.add_argument("run", help="the teacher's run directory, runs/<name>")
    di.add_argument(
        "items", nargs="+", help="student=<model yaml>, then key=value on that run's config"
    )
    plugins.add_flag(di)
    ex = sub.add_parser(
        "export", help="an edge bundle from a checkpoint (configs/edge/export.yaml: key=value)"
    )
    ex.add_argument(
        "model", help="a .pt checkpoint (e.g. runs/<name>/best.pt); with --check, a bundle"
    )
    ex.add_argument("overrides", nargs="*", help="e.g. quantize=8 imgsz=320")
    ex.add_argument("--check", action="store_true", help="re-run the gates of an existing bundle")
    be = sub.add_parser(
        "bench", help="latency, memory, size and mAP of models (configs/edge/bench.yaml: key=value)"
    )
    be.add_argument("items", nargs="+", help="models (.pt, .onnx, bundle folders), then key=value")
    d = sub.add_parser("data", help="synthetic data, partitions, checks")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="generate the synthetic driving fleet (YOLO format)")
    s.add_argument("out")
    from fl_client.data.partition import METHODS
    from fl_server import config as config_mod

    defaults = config_mod.compose()  # the data commands' defaults are the run's (configs/)
    synth = defaults.data.synth
    s.add_argument("--images", type=int, default=int(synth.images))
    s.add_argument("--imgsz", type=int, default=int(synth.imgsz))
    s.add_argument("--seed", type=int, default=int(defaults.seed))
    s.add_argument(
        "--domains",
        default=",".join(synth.domains),
        help="comma list of day,dusk,night,fog,rain,blur",
    )
    pa = dsub.add_parser("partition", help="split a dataset into client shards")
    pa.add_argument("data", help="data.yaml, Roboflow export folder or COCO json")
    pa.add_argument("out")
    pa.add_argument("--clients", type=int, required=True)
    pa.add_argument("--method", default=defaults.data.partition, choices=list(METHODS))
    pa.add_argument("--alpha", type=float, default=float(defaults.data.alpha))
    pa.add_argument("--seed", type=int, default=int(defaults.seed))
    for flag in ("server_val_fraction", "client_val_fraction"):
        pa.add_argument(f"--{flag.replace('_', '-')}", type=float, default=defaults.data[flag])
    c = dsub.add_parser("check", help="list bad images and labels (exit 3 if any)")
    c.add_argument("path")
    c.add_argument("--report", help="write the report as JSON here")
    c.add_argument("--work-dir", help="write repaired label copies here")
    ci = sub.add_parser(
        "clearml-import", help="import a run's offline ClearML session(s) into the server"
    )
    ci.add_argument("run", help="the run directory, runs/<name>")
    dep = sub.add_parser("deploy", help="container images, certificates and keys")
    depsub = dep.add_subparsers(dest="deploy_cmd", required=True)
    im = depsub.add_parser("images", help="build the server and client images (BuildKit)")
    im.add_argument(
        "--offline",
        action="store_true",
        help="no registry or index from containers: a local debootstrap base and a wheelhouse",
    )
    im.add_argument("--base", help="BASE_IMAGE (default python:3.11-slim; offline: local base)")
    im.add_argument("--torch-index", default="", help="e.g. https://download.pytorch.org/whl/cpu")
    im.add_argument("--role", choices=["server", "client"], action="append", help="default both")
    aws = depsub.add_parser(
        "aws", help="EC2 Auto Scaling deployment (configs/deploy/aws.yaml: key=value)"
    )
    aws.add_argument("action", choices=["plan", "up", "push", "status", "scale", "down"])
    aws.add_argument("items", nargs="*", help="scale: the client count first; then key=value")
    ce = depsub.add_parser("certs", help="a CA, a SuperLink certificate and client key pairs")
    ce.add_argument("out", help="folder for the files (created 0700)")
    ce.add_argument("--clients", type=int, required=True, help="key pairs supernode-0..N-1")
    ce.add_argument(
        "--host",
        action="append",
        help="a name or IP clients dial, repeatable (default: superlink, localhost, 127.0.0.1)",
    )
    return p


def _overrides_file(path: str | None) -> list[str]:
    """The overrides in a yaml list file (``--from``); ConfigError names a bad file."""
    if not path:
        return []
    import yaml

    from fl_server.config import ConfigError

    try:
        items = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--from {path}: cannot read it ({type(e).__name__})") from e
    if not isinstance(items, list) or not all(isinstance(o, str) and "=" in o for o in items):
        raise ConfigError(f"--from {path}: expected a yaml list of key=value overrides")
    return items


def cmd_tune(overrides: list[str]) -> int:
    """``fedyolo tune``: the tuning package is imported only for this command."""
    from tuning.study import tune

    _setup_logging()
    st = tune(overrides)
    print(f"study {st.optuna_study.study_name}: {st.folder / 'summary.md'}")
    return 0


def cmd_clearml_import(path: str) -> int:
    from fl_server.run_dir import RunDir
    from fl_server.tracking import import_offline

    _setup_logging()
    task_id = import_offline(RunDir(Path(path)))
    print(f"imported {path} as ClearML task {task_id}")
    return 0


def cmd_distill(run: str, items: list[str]) -> int:
    from fl_server import api
    from fl_server.config import ConfigError

    students = [i.split("=", 1)[1] for i in items if i.startswith("student=")]
    if len(students) != 1:
        raise ConfigError("distill: give the student once, e.g. student=yolov8n.yaml")
    _setup_logging()
    teacher = api.Summary.read(Path(run))
    summary = api.distill(run, students[0], [i for i in items if not i.startswith("student=")])
    if summary.status != "completed":
        print(f"fedyolo: {summary.run_dir} ended with status {summary.status}", file=sys.stderr)
        return 1
    print(
        f"student {students[0]}: best mAP50-95 {summary.best.map50_95:.3f} "
        f"(round {summary.best.round}) on the same held-out set as its teacher's "
        f"{teacher.best.map50_95:.3f} → {summary.best_checkpoint}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``fedyolo export``: exit 0 for an accepted bundle, 1 for a rejected one (one line why)."""
    from deploy.edge import export, settings

    cfg = settings.load("export", args.overrides)
    _setup_logging()
    if args.check:
        report = export.check(Path(args.model), cfg)
        meta = json.loads((Path(args.model) / "model.json").read_text())
        bundle = Path(args.model)
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
        return 1
    print(
        f"{meta['variant']}: {bundle / meta['file']} ({meta['size_bytes'] / 1e6:.1f} MB), "
        f"gates passed: {figures}"
    )
    return 0


def cmd_bench(items: list[str]) -> int:
    from deploy.edge import bench, settings

    models = [i for i in items if "=" not in i]
    cfg = settings.load("bench", [i for i in items if "=" in i])
    if not models:
        raise settings.EdgeError("bench: give at least one model (.pt, .onnx or bundle folder)")
    _setup_logging()
    report = bench.bench([Path(m) for m in models], cfg)
    print(bench.table(report["results"]), end="")
    print(f"written: {report['out']}/bench.json, bench.md, bench.png")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    _setup_logging()
    if args.deploy_cmd == "images":
        from deploy.images import ROLES, build_images

        built = build_images(
            offline=args.offline,
            base=args.base,
            torch_index=args.torch_index,
            roles=tuple(args.role or ROLES),
        )
        for b in built:
            print(f"{b.tag}: {b.size_bytes / 1e9:.2f} GB, built in {b.seconds:.0f} s")
        return 0
    if args.deploy_cmd == "aws":
        return cmd_aws(args.action, args.items)
    from deploy.local import make_security, node_names

    hosts = args.host or ["superlink", "localhost", "127.0.0.1"]
    sec = make_security(Path(args.out), hosts, node_names(args.clients), insecure=False)
    print(f"CA {sec.root_ca}; SuperLink certificate for {', '.join(hosts)}")
    for name, keys in sec.node_keys.items():
        print(f"{name}: private {keys.private} (0600), public {keys.public}")
    print("register each public key: flwr supernode register <public key> <federation>")
    return 0


def cmd_aws(action: str, items: list[str]) -> int:
    """``fedyolo deploy aws``: plan prints and creates nothing; down exits 1 with one line per
    leftover."""
    from deploy.aws import AwsError, stack

    count = None
    if action == "scale":
        if not items or not items[0].isdigit():
            raise AwsError("deploy aws scale: give the number of clients first, e.g. scale 4")
        count, items = int(items[0]), items[1:]
    cfg = stack.load_settings(items)
    if action == "plan":
        rows = stack.plan(cfg)
        for r in rows:
            cost = f"  ${r['usd_per_hour']:.3f}/h" if r["usd_per_hour"] else ""
            print(f"{r['action']:7} {r['kind']:18} {cfg.name}-{r['name']}{cost}  {r['what']}")
        total = sum(r["usd_per_hour"] for r in rows)
        print(
            f"estimated ${total:.2f}/h (${total * 730:.0f}/month) for instances and volumes; "
            f"prices from configs/deploy/aws.yaml ({cfg.prices.date}; check them)"
        )
        return 0
    if action == "up":
        rows = stack.up(cfg)
        made = [r for r in rows if r["action"] == "created"]
        print(f"{len(made)} created, {len(rows) - len(made)} already there")
        return 0
    if action == "push":
        from deploy.aws import ecr

        for r in ecr.push(cfg):
            print(f"{r['action']:7} {r['image']} -> {r['target']}  {r.get('digest', '')}")
        return 0
    if action == "scale":
        print(json.dumps(stack.scale(cfg, count)))
        return 0
    if action == "status":
        print(json.dumps(stack.status(cfg), indent=1, default=str))
        return 0
    left = stack.down(cfg)
    for line in left:
        print(line, file=sys.stderr)
    if not left:
        print(f"deployment {cfg.name}: nothing left")
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deploy import DeployError  # light: the engines are imported when they run
    from fl_client.data.errors import DataError
    from fl_client.model import ModelConfigError
    from fl_server import plugins
    from fl_server.config import ConfigError
    from tuning.space import TuningError  # light: the study itself is imported by `tune` only

    try:
        plugins.grant(getattr(args, "trust_plugin", None) or [])  # --trust-plugin, this run only
        if args.cmd == "run":
            return cmd_run([*_overrides_file(args.from_file), *args.overrides])
        if args.cmd == "tune":
            return cmd_tune(args.overrides)
        if args.cmd == "clearml-import":
            return cmd_clearml_import(args.run)
        if args.cmd == "deploy":
            return cmd_deploy(args)
        if args.cmd == "distill":
            return cmd_distill(args.run, args.items)
        if args.cmd == "export":
            return cmd_export(args)
        if args.cmd == "bench":
            return cmd_bench(args.items)
        return cmd_data(args)
    except (
        ConfigError,
        DataError,
        ModelConfigError,
        FileNotFoundError,
        TuningError,
        DeployError,
    ) as e:  # EdgeError is a DeployError
        print(f"fedyolo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedyolo: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # what a machine does to a run (a full disk, a read-only folder)
        if e.errno not in USER_OS_ERRORS:
            raise
        print(f"fedyolo: error: {e.strerror}: {e.filename or 'a file'}", file=sys.stderr)
        return 2
    finally:
        plugins.grant([])  # the grant was this command's, not the process's


if __name__ == "__main__":
    sys.exit(main())
