"""``fedyolo deploy images|aws|certs``: container images, EC2 Auto Scaling, TLS and node keys.

Registered in the ``fedyolo.commands`` entry-point group (``pyproject.toml``). The AWS steps
need boto3 (``fedyolo[deploy]``), imported by ``deploy.aws`` only when a step runs; a step that
cannot run is a ``DeployError`` (a ``UserError``: one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deploy.aws import AwsError, ecr, stack
from deploy.images import PLATFORMS, ROLES, ImageError, build_images, relock
from deploy.local import make_security, node_names
from fl_client.errors import ExitCode
from fl_server.cli import setup_logging


def deploy_command(parser: argparse.ArgumentParser) -> None:
    """container images, certificates and keys"""
    sub = parser.add_subparsers(dest="deploy_cmd", required=True)
    im = sub.add_parser("images", help="build the server and client images (BuildKit)")
    im.add_argument(
        "--offline",
        action="store_true",
        help="no registry or index from containers: a local debootstrap base and a wheelhouse",
    )
    im.add_argument("--base", help="BASE_IMAGE (default python:3.11-slim; offline: local base)")
    im.add_argument("--torch-index", default="", help="e.g. https://download.pytorch.org/whl/cpu")
    im.add_argument("--role", choices=["server", "client"], action="append", help="default both")
    im.add_argument(
        "--platform",
        choices=sorted(PLATFORMS),
        default="linux/amd64",
        help="linux/arm64: the client for edge devices (offline: debootstrap --arch arm64, "
        "aarch64 wheels; runs under qemu emulation on an x86_64 host)",
    )
    im.add_argument(
        "--tag", action="append", metavar="ROLE=TAG", help="e.g. client=fedyolo-client:dev"
    )
    im.add_argument(
        "--relock",
        action="store_true",
        help="resolve the platform's lock (deploy/docker/lock-<arch>.txt) again from "
        "pyproject.toml's pins before building",
    )
    im.set_defaults(handler=_images)
    aws = sub.add_parser(
        "aws", help="EC2 Auto Scaling deployment (configs/deploy/aws.yaml: key=value)"
    )
    aws.add_argument(
        "action",
        choices=["plan", "up", "push", "status", "scale", "down", "template", "data", "rehearse"],
    )
    aws.add_argument(
        "items",
        nargs="*",
        help="scale: the client count first; data: upload <partition folder>; rehearse: "
        "out=DIR rounds=N ...; then key=value",
    )
    aws.add_argument(
        "--delete-state",
        action="store_true",
        help="down: also delete the state bucket and its every version (the model, checkpoints)",
    )
    aws.set_defaults(handler=_aws)
    ce = sub.add_parser("certs", help="a CA, a SuperLink certificate and client key pairs")
    ce.add_argument("out", help="folder for the files (created 0700)")
    ce.add_argument("--clients", type=int, required=True, help="key pairs supernode-0..N-1")
    ce.add_argument(
        "--host",
        action="append",
        help="a name or IP clients dial, repeatable (default: superlink, localhost, 127.0.0.1)",
    )
    ce.set_defaults(handler=_certs)
    dn = sub.add_parser(
        "down", help="remove what a compose run left (engine.keep=true, a killed fedyolo)"
    )
    dn.add_argument("run", help="the run directory, e.g. runs/<name>")
    dn.set_defaults(handler=_compose_down)


def _images(args: argparse.Namespace) -> ExitCode:
    setup_logging()
    tags = dict(t.split("=", 1) for t in args.tag or [] if "=" in t)
    if len(tags) != len(args.tag or []) or not set(tags) <= set(ROLES):
        raise ImageError(f"--tag: give ROLE=TAG with ROLE one of {', '.join(ROLES)}")
    if args.relock:
        print(f"rewrote {relock(args.platform)}")
    built = build_images(
        offline=args.offline,
        base=args.base,
        torch_index=args.torch_index,
        roles=tuple(args.role) if args.role else None,
        tags=tags,
        platform=args.platform,
    )
    for b in built:
        print(f"{b.tag}: {b.size_bytes / 1e9:.2f} GB, built in {b.seconds:.0f} s")
    return ExitCode.OK


def _compose_down(args: argparse.Namespace) -> ExitCode:
    """The run's compose project (containers, network, volumes), found from its directory."""
    from deploy import compose

    setup_logging()
    print(f"removed compose project {compose.down(Path(args.run))}")
    return ExitCode.OK


def _certs(args: argparse.Namespace) -> ExitCode:
    setup_logging()
    hosts = args.host or ["superlink", "localhost", "127.0.0.1"]
    sec = make_security(Path(args.out), hosts, node_names(args.clients), insecure=False)
    print(f"CA {sec.root_ca}; SuperLink certificate for {', '.join(hosts)}")
    for name, keys in sec.node_keys.items():
        print(f"{name}: private {keys.private} (0600), public {keys.public}")
    print("register each public key: flwr supernode register <public key> <federation>")
    return ExitCode.OK


def _aws(args: argparse.Namespace) -> ExitCode:
    """``fedyolo deploy aws``: plan prints and creates nothing; down exits 1 with one line per
    leftover; template prints the CloudFormation template (JSON) and calls nothing."""
    setup_logging()
    items, count = args.items, None
    if args.action == "scale":
        if not items or not items[0].isdigit():
            raise AwsError("deploy aws scale: give the number of clients first, e.g. scale 4")
        count, items = int(items[0]), items[1:]
    if args.action == "data":
        return _data(items)
    if args.action == "rehearse":  # the boot path on this machine (deploy.aws.rehearse)
        from deploy.aws import rehearse

        return rehearse.command(items)
    cfg = stack.load_settings(items)
    if args.action == "plan":
        _plan(cfg)
    elif args.action == "up":
        done = stack.up(cfg)
        _changes(done["changes"])
        keys = done["parameters"]
        print(
            f"{done['stack']}: {done['status']}; SSM parameters {keys['created']} created, "
            f"{keys['kept']} kept"
            + ("" if done["images_ready"] else "; groups at 0 until `fedyolo deploy aws push`")
        )
    elif args.action == "push":
        for r in ecr.push(cfg):
            print(f"{r['action']:7} {r['image']} -> {r['target']}  {r.get('digest', '')}")
    elif args.action == "scale":
        print(json.dumps(stack.scale(cfg, count)))
    elif args.action == "template":  # what plan and up deploy (deploy.aws.template)
        from deploy.aws.template import to_json

        print(to_json(cfg))
    elif args.action == "status":
        print(json.dumps(stack.status(cfg), indent=1, default=str))
    else:
        return _down(cfg, args.delete_state)
    return ExitCode.OK


def _data(items: list[str]) -> ExitCode:
    """``deploy aws data upload <partition folder> [key=value ...]`` (``deploy.aws.data``)."""
    from deploy.aws import data

    if len(items) < 2 or items[0] != "upload" or "=" in items[1]:
        raise AwsError("deploy aws data: give `upload <partition folder>`, then key=value")
    cfg = stack.load_settings(items[2:])
    for r in data.upload(cfg, Path(items[1])):
        print(
            f"{r['prefix']}: {r['files']} files, {r['uploaded']} uploaded, "
            f"{r['unchanged']} unchanged, {r['deleted']} deleted"
        )
    return ExitCode.OK


def _changes(changes: list[dict]) -> None:
    for c in changes:
        repl = f"  replacement: {c['replacement']}" if c["replacement"] else ""
        print(f"{c['action']:7} {c['logical']:24} {c['type']}{repl}")


def _plan(cfg: Any) -> None:  # deploy.aws.stack's settings
    got = stack.plan(cfg)
    _changes(got["changes"])
    if not got["changes"]:
        print(f"{got['stack']}: no changes")
    print(f"costs per month ({got['counts']} instance counts; prices unverified):")
    for r in got["costs"]:
        what = f"{r['item']}: {r['quantity']:g} {r['unit']} x {r['price']:g}"
        print(f"  ${r['usd_month']:9.2f}  {what}")
    print(
        f"estimated ${got['usd_month']:.2f}/month; prices from configs/deploy/aws.yaml "
        f"({cfg.prices.date}), unverified: check them for {cfg.region}"
    )


def _down(cfg: Any, delete_state: bool = False) -> ExitCode:
    left = stack.down(cfg, delete_state=delete_state)
    for line in left:
        print(line, file=sys.stderr)
    if not left:
        kept = "" if delete_state else " (state bucket kept; --delete-state deletes it)"
        print(f"deployment {cfg.name}: stack and keys deleted{kept}")
    return ExitCode.FAILED if left else ExitCode.OK
