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

A table of commands, as Optuna's: each package registers its own in the ``fedyolo.commands``
entry-point group (``pyproject.toml``; ``fl_server.commands``, ``tuning.cli``, ``deploy.cli``,
``deploy.edge.cli``), loaded and checked as every plug-in is (``fl_server.plugins``). A command
is a function ``add(parser)`` that adds its arguments and ``set_defaults(handler=...)``; its
docstring's first line is its help. ``main`` builds the table and calls ``args.handler(args)``.
Nothing heavy (torch, Ultralytics, a composed config) is imported before a handler runs.

A user's mistake (a ``UserError``, ``fl_client.errors``) or a full disk ends with one line and
an exit code from ``ExitCode``; a bug still raises.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import logging
import sys
from collections.abc import Callable

from fl_client.errors import ExitCode, UserError
from fl_server import plugins
from fl_server.process_env import set_process_environment

LOGGER = logging.getLogger("fedyolo")
# OSErrors a user meets and can act on, said in one line (any other is a bug: it raises)
USER_OS_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def setup_logging(level: str = "INFO") -> None:
    """fedyolo's lines on the console; Flower's and Ultralytics' chatter kept out of them."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    ultralytics = logging.getLogger("ultralytics")  # not imported here: it imports torch
    if _warnings_and_up not in ultralytics.filters:
        ultralytics.addFilter(_warnings_and_up)
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines


def _warnings_and_up(record: logging.LogRecord) -> bool:
    """Ultralytics' warnings and errors, not its INFO lines. A filter, not ``setLevel``: the
    logger's level is set by Ultralytics when a command imports it, after ``setup_logging``."""
    return record.levelno >= logging.WARNING


def commands() -> dict[str, Callable[[argparse.ArgumentParser], None]]:
    """The registered commands by name, each loaded and checked (a PluginError is one line)."""
    paths = plugins.registered(plugins.COMMAND)
    if not paths:
        raise UserError(
            f"no commands are registered (entry points {plugins.COMMAND.group}); "
            "is fedyolo installed (pip install -e .)?"
        )
    return {
        name: plugins.load(path, plugins.COMMAND, (), f"command {name}")
        for name, path in sorted(paths.items())
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedyolo",
        description="Federated training of Ultralytics YOLO detectors with Flower: "
        "fedyolo COMMAND --help for a command's options.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, add in commands().items():
        doc = inspect.getdoc(add) or ""
        add(sub.add_parser(name, help=doc.splitlines()[0], description=doc))
    return p


def main(argv: list[str] | None = None) -> int:
    set_process_environment()  # before any command imports Ultralytics or Flower's runtime
    try:
        args = build_parser().parse_args(argv)
        plugins.grant(getattr(args, "trust_plugin", None) or [])  # --trust-plugin, this run only
        return int(args.handler(args))
    except UserError as e:
        print(f"fedyolo: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("fedyolo: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except OSError as e:  # what a machine does to a run (a full disk, a read-only folder)
        if e.errno not in USER_OS_ERRORS:
            raise
        print(f"fedyolo: error: {e.strerror}: {e.filename or 'a file'}", file=sys.stderr)
        return int(ExitCode.USER_ERROR)
    finally:
        plugins.grant([])  # the grant was this command's, not the process's


if __name__ == "__main__":
    sys.exit(main())
