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
from deploy.images import ROLES, build_images
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
    im.set_defaults(handler=_images)
    aws = sub.add_parser(
        "aws", help="EC2 Auto Scaling deployment (configs/deploy/aws.yaml: key=value)"
    )
    aws.add_argument(
        "action", choices=["plan", "up", "push", "status", "scale", "down", "template"]
    )
    aws.add_argument("items", nargs="*", help="scale: the client count first; then key=value")
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


def _images(args: argparse.Namespace) -> ExitCode:
    setup_logging()
    built = build_images(
        offline=args.offline,
        base=args.base,
        torch_index=args.torch_index,
        roles=tuple(args.role or ROLES),
    )
    for b in built:
        print(f"{b.tag}: {b.size_bytes / 1e9:.2f} GB, built in {b.seconds:.0f} s")
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
    cfg = stack.load_settings(items)
    if args.action == "plan":
        _plan(cfg)
    elif args.action == "up":
        rows = stack.up(cfg)
        made = [r for r in rows if r["action"] == "created"]
        print(f"{len(made)} created, {len(rows) - len(made)} already there")
    elif args.action == "push":
        for r in ecr.push(cfg):
            print(f"{r['action']:7} {r['image']} -> {r['target']}  {r.get('digest', '')}")
    elif args.action == "scale":
        print(json.dumps(stack.scale(cfg, count)))
    elif args.action == "template":  # CloudFormation, work in progress (deploy.aws.template)
        from deploy.aws.template import to_json

        print(to_json(cfg))
    elif args.action == "status":
        print(json.dumps(stack.status(cfg), indent=1, default=str))
    else:
        return _down(cfg)
    return ExitCode.OK


def _plan(cfg: Any) -> None:  # deploy.aws.stack's settings
    rows = stack.plan(cfg)
    for r in rows:
        cost = f"  ${r['usd_per_hour']:.3f}/h" if r["usd_per_hour"] else ""
        print(f"{r['action']:7} {r['kind']:18} {cfg.name}-{r['name']}{cost}  {r['what']}")
    total = sum(r["usd_per_hour"] for r in rows)
    print(
        f"estimated ${total:.2f}/h (${total * 730:.0f}/month) for instances and volumes; "
        f"prices from configs/deploy/aws.yaml ({cfg.prices.date}; check them)"
    )


def _down(cfg: Any) -> ExitCode:
    left = stack.down(cfg)
    for line in left:
        print(line, file=sys.stderr)
    if not left:
        print(f"deployment {cfg.name}: nothing left")
    return ExitCode.FAILED if left else ExitCode.OK
