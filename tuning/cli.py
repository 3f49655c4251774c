"""``fedyolo tune``: an Optuna study whose trials are federations.

Registered in the ``fedyolo.commands`` entry-point group (``pyproject.toml``), as every package
registers its own commands. ``tuning.tune`` imports the study (Optuna) only when it runs, so
``fedyolo --help`` stays light.
"""

from __future__ import annotations

import argparse

import tuning
from fl_client.errors import ExitCode
from fl_server import plugins
from fl_server.cli import setup_logging


def tune_command(parser: argparse.ArgumentParser) -> None:
    """an Optuna study whose trials are federations (tuning.* and base overrides)"""
    parser.add_argument("overrides", nargs="*", help="e.g. tuning.trials=20 federation.clients=4")
    plugins.add_flag(parser)
    parser.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> ExitCode:
    setup_logging()
    st = tuning.tune(args.overrides)
    print(f"study {st.optuna_study.study_name}: {st.folder / 'summary.md'}")
    return ExitCode.OK
