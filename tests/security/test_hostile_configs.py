"""A config file someone hands you cannot run code (issue 28, item 3).

A plug-in named by a config (``strategy._target_``, ``hooks``, an engine) is imported only when
trusted: installed as an entry point, or named with ``--trust-plugin`` on this command line
(``fl_server.plugins``). A ``--from`` file, a run directory's ``config.yaml`` and a Hydra
override never grant it; what is imported is checked to be the right kind before anything is
called. Each refusal is one line. The hostile plug-in below leaves a file behind when imported
(``imported``) or called (``called``), so "nothing ran" is a file that does not exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fl_server import plugins
from fl_server.cli import main
from fl_server.config import ConfigError, compose, from_run, to_yaml

MODULE = "fedyolo_hostile_plugin"
PLUGIN = """
from pathlib import Path

from flwr.serverapp.strategy import FedAvg

HERE = Path(__file__).parent
(HERE / "imported").touch()


class GoodStrategy(FedAvg):
    pass


def strategy_factory(**kwargs):
    (HERE / "called").touch()
    return FedAvg(**kwargs)


def hook_factory(run):
    (HERE / "called").touch()


def touch(**kwargs):
    (HERE / "called").touch()
"""


@pytest.fixture
def hostile(tmp_path, monkeypatch) -> Path:
    """A plug-in module on sys.path that records being imported or called in its folder."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield folder
    sys.modules.pop(MODULE, None)


class _RunsCode:
    """Unpickling this opens (creates) ``marker``: what a crafted checkpoint can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted_pt(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"model": _RunsCode(marker)}, path)
    return path


def _one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("fedyolo: error: ") and "\n" not in err, err
    return err


def _from_file(tmp_path: Path, items: list[str]) -> Path:
    import yaml

    path = tmp_path / "handed-over.yaml"
    path.write_text(yaml.safe_dump(items))
    return path


def test_a_torch_load_strategy_from_a_config_file_runs_nothing(tmp_path, capsys):
    control = tmp_path / "control-ran"
    import torch

    torch.load(_crafted_pt(tmp_path / "control.pt", control), weights_only=False)
    assert control.exists()  # the crafted file does run code when fully unpickled

    marker = tmp_path / "pickle-ran"
    evil = _crafted_pt(tmp_path / "evil.pt", marker)
    cfg = _from_file(
        tmp_path,
        [
            "strategy=custom",
            "strategy._target_=torch.load",
            f"+strategy.f={evil}",
            "+strategy.weights_only=false",
        ],
    )
    out = tmp_path / "runs"
    assert main(["run", "--from", str(cfg), f"output.dir={out}"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "strategy._target_" in err and "torch:load is not trusted" in err
    assert "--trust-plugin torch:load" in err  # how to trust it, if the user means it
    # even trusted on the command line, a function is not a Strategy class: refused uncalled
    argv = ["run", "--from", str(cfg), "--trust-plugin", "torch:load", f"output.dir={out}"]
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert "not a Flower Strategy class" in err
    assert not marker.exists() and not out.exists()


_HOOKS_SCRIPT = """
import contextlib, io, json, sys
from fl_server.cli import main
out = {}
for hook in ("os:system", "antigravity:x"):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        # distill.teacher is checked after the hooks: a run that got past them stops there
        rc = main(["run", f"hooks=[{hook}]", "output.dir=" + sys.argv[1],
                   "distill.teacher=/nowhere/teacher.pt"])
    out[hook] = [rc, err.getvalue()]
out["imported"] = "antigravity" in sys.modules
print(json.dumps(out))
"""


def test_hooks_by_import_path_are_refused_without_importing_them(tmp_path):
    """In a fresh interpreter, so that ``sys.modules`` tells what the refusal imported."""
    proc = subprocess.run(
        [sys.executable, "-c", _HOOKS_SCRIPT, str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for hook in ("os:system", "antigravity:x"):
        rc, err = out[hook]
        err = _one_line(err)
        assert rc == 2 and f"hooks: round hook {hook} is not trusted" in err
        assert f"--trust-plugin {hook}" in err
    assert out["imported"] is False


@pytest.mark.parametrize(
    "grant",
    [
        f"+trusted_plugins=[{MODULE}:GoodStrategy]",
        f"trusted_plugins=[{MODULE}:GoodStrategy]",
        f"--trust-plugin={MODULE}:GoodStrategy",
    ],
)
def test_a_from_file_cannot_grant_trust(tmp_path, hostile, capsys, grant):
    items = ["strategy=custom", f"strategy._target_={MODULE}.GoodStrategy", grant]
    out = tmp_path / "runs"
    assert main(["run", "--from", str(_from_file(tmp_path, items)), f"output.dir={out}"]) == 2
    _one_line(capsys.readouterr().err)
    assert not (hostile / "imported").exists() and not out.exists()


def test_a_run_directory_handed_over_grants_nothing(tmp_path, hostile):
    """Its config.yaml says the plug-in was trusted: ``fedyolo distill`` (``from_run``) and
    ``resume=`` compose it again with this command line's grant, which is empty."""
    run = tmp_path / "handed-run"
    run.mkdir()
    with plugins.trusting([f"{MODULE}:GoodStrategy"]):
        text = to_yaml(compose(["strategy=custom", f"strategy._target_={MODULE}.GoodStrategy"]))
    (hostile / "imported").unlink()  # imported above, by the trusting user
    sys.modules.pop(MODULE, None)
    assert f"- {MODULE}:GoodStrategy" in text  # the record the ServerApp would honour
    (run / "config.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        from_run(run, [])
    assert "is not trusted" in str(e.value) and "\n" not in str(e.value)
    assert not (hostile / "imported").exists()


def test_the_trust_flag_lets_a_genuine_plugin_run_and_reaches_the_server_app(tmp_path, monkeypatch):
    """``--trust-plugin`` → the composed config carries the grant → the ServerApp, serving the
    run directory after the command's grant is gone, builds and runs the plug-in."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "strategies"))
    from inprocess import TINY, InProcessGrid
    from plugin_example import DampedFedAvg  # the README's example plug-in

    from fl_server import api
    from fl_server.prepare import prepare_run
    from fl_server.server_app import serve

    composed = []

    def engine_stand_in(cfg):
        composed.append(cfg)
        raise KeyboardInterrupt  # main's exit 130: the config is all this test needs from it

    monkeypatch.setattr(api, "run", engine_stand_in)
    rc = main(
        [
            "run",
            "--trust-plugin",
            "plugin_example:DampedFedAvg",
            *TINY,
            "federation.clients=2",
            f"output.dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'synth-cache'}",
            "tracking.enabled=false",
            "strategy=custom",
            "strategy._target_=plugin_example.DampedFedAvg",
            "+strategy.damping=0.25",
        ]
    )
    assert rc == 130 and plugins.granted() == ()  # the grant was that command's only
    (cfg,) = composed
    DampedFedAvg.calls.clear()
    run = prepare_run(cfg)
    serve(InProcessGrid(2), run.path)
    assert DampedFedAvg.calls == [(1, 0.25)]
    assert json.loads(run.summary.read_text())["status"] == "completed"


@pytest.mark.parametrize(
    "target,overrides,kind",
    [
        ("os:getcwd", ["strategy=custom", "strategy._target_=os.getcwd"], "Strategy class"),
        (
            f"{MODULE}:strategy_factory",
            ["strategy=custom", f"strategy._target_={MODULE}.strategy_factory"],
            "not a Flower Strategy class",
        ),
        (f"{MODULE}:hook_factory", [f"hooks=[{MODULE}:hook_factory]"], "not a round hook class"),
    ],
)
def test_a_trusted_plugin_of_the_wrong_kind_is_refused_before_it_is_called(
    hostile, target, overrides, kind
):
    with plugins.trusting([target]), pytest.raises(ConfigError) as e:
        compose(overrides)
    assert kind in str(e.value) and "refused before any call" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (hostile / "called").exists()


def test_a_trusted_strategy_cannot_smuggle_code_in_its_arguments(hostile):
    """Hydra would build a nested ``_target_`` argument (or take ``_args_``) before calling
    the trusted class: arguments are plain data."""
    nested = f"+strategy.extra={{_target_: {MODULE}.touch}}"
    base = ["strategy=custom", f"strategy._target_={MODULE}.GoodStrategy"]
    with plugins.trusting([f"{MODULE}:GoodStrategy"]):
        with pytest.raises(ConfigError) as e:
            compose([*base, nested])
        assert "\n" not in str(e.value)
        with pytest.raises(ConfigError, match="Hydra's instantiate keys"):
            compose([*base, f"+strategy._args_=[{MODULE}.touch]"])
    assert not (hostile / "called").exists()


def test_installed_entry_points_are_trusted_and_still_checked(hostile, monkeypatch):
    """fedyolo's own hooks are entry points (pyproject.toml); a package's strategy entry point
    needs no flag; an engine entry point that is not an engine function is refused uncalled."""
    from importlib.metadata import EntryPoint

    from fl_server import engines

    assert compose(["hooks=[deploy.aws.cloudwatch:RoundMetrics]"]).trusted_plugins == []
    installed = {
        "fedyolo.strategies": [EntryPoint("good", f"{MODULE}:GoodStrategy", "fedyolo.strategies")]
    }
    monkeypatch.setattr(plugins, "entry_points", lambda group: installed.get(group, []))
    cfg = compose(["strategy=custom", f"strategy._target_={MODULE}.GoodStrategy"])
    assert cfg.trusted_plugins == []
    bad = EntryPoint("bad", f"{MODULE}:touch", "fedyolo.engines")
    monkeypatch.setattr(engines, "_entry_points", lambda: {"bad": bad})
    with pytest.raises(plugins.PluginError, match="not an engine function"):
        engines.get("bad")
    assert not (hostile / "called").exists()


def test_the_trust_flag_takes_exact_import_paths_only(capsys):
    assert main(["run", "--trust-plugin", "my_pkg.*", "federation.clients=1"]) == 2
    assert "expected an exact import path" in _one_line(capsys.readouterr().err)
