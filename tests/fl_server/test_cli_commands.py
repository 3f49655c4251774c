"""The command line is a table of registered commands with one error base (issue 29, item 2).

Commands come from the ``fedyolo.commands`` entry points of the package that owns each, help
imports nothing heavy, a user's mistake is a ``UserError`` (one line, its exit code) and a
``FileNotFoundError`` from a bug raises instead of passing for a user's mistake.
"""

from __future__ import annotations

import ast
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fl_client.errors import ExitCode, MissingInput, UserError
from fl_server import cli, commands, plugins

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ultralytics", "hydra", "flwr", "optuna", "boto3", "matplotlib")


def test_help_imports_no_heavy_library_and_composes_no_config():
    code = f"""
import json, logging, sys
from fl_server import cli, config
config.compose = None  # composing a config for help would fail here
out = {{}}
for argv in (["--help"], *([name, "--help"] for name in cli.commands())):
    try:
        cli.main(argv)
    except SystemExit as e:
        out[" ".join(argv)] = e.code
cli.setup_logging()
record = logging.LogRecord("ultralytics", logging.INFO, "", 0, "epoch 1", None, None)
out["ultralytics_info_passes"] = bool(logging.getLogger("ultralytics").filter(record))
out["heavy"] = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps(out))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("heavy") == []
    assert out.pop("ultralytics_info_passes") is False  # quieted without importing it
    assert out == {k: 0 for k in out} and len(out) == 1 + len(plugins.registered(plugins.COMMAND))


def test_the_commands_are_the_registered_entry_points():
    registered = plugins.registered(plugins.COMMAND)
    assert {"run", "tune", "distill", "data", "export", "bench", "deploy", "clearml-import"} <= set(
        registered
    )
    assert registered["tune"].startswith("tuning.") and registered["export"].startswith("deploy.")
    sub = next(a for a in cli.build_parser()._actions if a.dest == "cmd")
    assert sorted(sub.choices) == sorted(registered)
    # the dispatcher imports no package's commands: each package registers its own
    tree = ast.parse((ROOT / "fl_server" / "cli.py").read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert not {m for m in imported if m and m.split(".")[0] in ("tuning", "deploy")}
    # nor the library entry point (the run preparation, OpenCV, NumPy): the process environment
    # it sets comes from the light fl_server.process_env
    assert "fl_server.api" not in imported and "fl_server.process_env" in imported


def test_run_sources_are_registered_so_fl_server_imports_no_deploy():
    assert plugins.registered(plugins.RUN_SOURCE)["s3"] == "deploy.aws.s3state:fetch"
    for module in ("config.py", "cli.py", "commands.py"):
        tree = ast.parse((ROOT / "fl_server" / module).read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                assert not (n.module or "").startswith("deploy"), (module, n.module)


def test_every_user_error_class_derives_from_the_one_base():
    from deploy import DeployError
    from deploy.aws.s3state import SyncError
    from deploy.edge import EdgeError
    from fl_client.data.errors import DataError
    from fl_client.model import ModelConfigError
    from fl_client.wire import WireError
    from fl_server.config import ConfigError
    from fl_server.plugins import PluginError
    from fl_server.state import StateError
    from strategies.registry import StrategyConfigError
    from tuning.space import TuningError

    for cls in (ConfigError, PluginError, DataError, ModelConfigError, WireError, StateError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    for cls in (TuningError, StrategyConfigError, DeployError, EdgeError, SyncError):
        assert issubclass(cls, UserError), cls
    assert UserError.exit_code == ExitCode.USER_ERROR == 2


def test_a_bugs_file_not_found_raises_a_users_is_one_line(monkeypatch, capsys):
    def bug(overrides):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/opt/internal.bin")

    monkeypatch.setattr(commands, "run_federation", bug)
    with pytest.raises(FileNotFoundError):
        cli.main(["run"])

    def missing(overrides):
        raise MissingInput("export: checkpoint /x/best.pt not found")

    monkeypatch.setattr(commands, "run_federation", missing)
    assert cli.main(["run"]) == 2
    assert capsys.readouterr().err == "fedyolo: error: export: checkpoint /x/best.pt not found\n"


def test_a_missing_teacher_run_is_one_line_naming_its_summary(tmp_path, capsys):
    assert cli.main(["distill", str(tmp_path / "nope"), "student=yolov8n.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedyolo: error: [Errno 2] No such file or directory: '{tmp_path / 'nope'}/summary.json'\n"
    )


def test_a_plugin_grant_ends_with_the_command(monkeypatch):
    seen = []
    monkeypatch.setattr(commands, "run_federation", lambda o: seen.append(plugins.granted()) or 0)
    assert cli.main(["run", "--trust-plugin", "my_pkg.mod:Thing"]) == 0
    assert seen == [("my_pkg.mod:Thing",)] and plugins.granted() == ()
