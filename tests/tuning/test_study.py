"""fedyolo tune: studies whose trials are real (tiny) federations in the simulation engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from testkit import TINY_BASE

from fl_server.cli import main
from fl_server.config import compose

SPACE = {
    "train.lr0": {"type": "float", "low": 0.005, "high": 0.05, "log": True},
    "strategy": {"type": "categorical", "choices": ["fedavg", "fedprox"]},
    "strategy.proximal_mu": {
        "type": "float", "low": 0.001, "high": 0.1, "log": True, "when": {"strategy": "fedprox"},
    },
}  # fmt: skip


def _args(tmp_path: Path, study: str, *extra: str, tracking: bool = False) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return [
        *TINY_BASE,
        "federation.clients=2",
        "data.synth.images=96",
        f"output.dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"tuning.study={study}",
        f"tuning.space={space}",
        f"tracking.enabled={str(tracking).lower()}",
        *extra,
    ]


def _load(folder: Path, name: str) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def test_a_tiny_study_records_what_its_federations_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ClearML offline, nothing outside tmp
    monkeypatch.delenv("CLEARML_API_HOST", raising=False)
    monkeypatch.delenv("CLEARML_CONFIG_FILE", raising=False)
    args = _args(
        tmp_path, "tiny", "tuning.trials=3", "federation.rounds=2", "tuning.pruner=none",
        tracking=True,
    )  # fmt: skip
    assert main(["tune", *args]) == 0
    folder = tmp_path / "runs" / "tiny"
    study = _load(folder, "tiny")  # the journal is Optuna's own format
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    # trial 0 is the base configuration's own values
    assert trials[0].params == {"train.lr0": compose(TINY_BASE).train.lr0, "strategy": "fedavg"}
    for t in trials:  # each value is the best held-out mAP50-95 its run directory reported
        summary = json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
        assert t.value == summary["best"]["map50_95"] and summary["rounds_completed"] == 2
        assert ("strategy.proximal_mu" in t.params) == (t.params["strategy"] == "fedprox")
    doc = json.loads((folder / "study.json").read_text())
    assert len(doc["trials"]) == 3 and doc["best"][0]["number"] == study.best_trial.number
    assert "fedyolo run --from" in (folder / "summary.md").read_text()
    assert (folder / "optimization_history.png").stat().st_size > 0

    # ClearML: one task for the study, every trial's value by number, each federation's own
    # task named after the study and listed with its id (offline sessions, parsed)
    from fl_server.run_dir import RunDir
    from fl_server.tracking import offline_scalars, sessions

    (study_session,) = sessions(RunDir(folder))
    values = offline_scalars(RunDir(folder))[("trials", "best_map")]
    assert values == {t.number: t.value for t in trials}
    for t in trials:
        run = RunDir(Path(t.user_attrs["run_dir"]))
        (own,) = sessions(run)
        assert t.user_attrs["clearml_task"] == own["task_id"] != study_session["task_id"]
        assert [r["clearml_task"] for r in doc["trials"]][t.number] == own["task_id"]
        with zipfile.ZipFile(own["folder"] + ".zip") as z:
            assert json.loads(z.read("task.json"))["name"] == f"tiny-trial-{t.number:04d}"
    with zipfile.ZipFile(study_session["folder"] + ".zip") as z:
        task = json.loads(z.read("task.json"))
    assert task["name"] == "tiny" and task["type"] == "optimizer"

    # best.yaml is what `fedyolo run --from` takes
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert (
        best[-len(study.best_trial.user_attrs["overrides"]) :]
        == (study.best_trial.user_attrs["overrides"])
    )
    extra = ["federation.rounds=1", "name=again", f"output.dir={tmp_path / 'runs'}"]
    assert main(["run", "--from", str(folder / "best.yaml"), *extra]) == 0
    assert json.loads((tmp_path / "runs" / "again" / "summary.json").read_text())["status"] == (
        "completed"
    )

    # running the same study again continues it: the finished trials are kept, and the study's
    # ClearML report names the earlier task (offline, ClearML cannot continue a task)
    args = _args(
        tmp_path, "tiny", "tuning.trials=4", "federation.rounds=1", "tuning.pruner=none",
        tracking=True,
    )  # fmt: skip
    assert main(["tune", *args]) == 0
    assert [t.number for t in _load(folder, "tiny").get_trials()] == [0, 1, 2, 3]
    first, second = sessions(RunDir(folder))
    assert first["task_id"] == study_session["task_id"]
    with zipfile.ZipFile(second["folder"] + ".zip") as z:
        task = json.loads(z.read("task.json"))
    assert task["name"] == f"tiny (continued from {first['task_id']})"
    assert set(offline_scalars(RunDir(folder))[("trials", "best_map")]) == {0, 1, 2, 3}


def test_a_pruned_trial_stops_early_with_a_complete_run_directory(tmp_path):
    args = _args(
        tmp_path, "pr", "tuning.trials=1", "federation.rounds=3", "tuning.pruner=threshold",
        "tuning.prune_below=1.0", "tuning.warmup_rounds=0",
    )  # fmt: skip
    assert main(["tune", *args]) == 0
    (trial,) = _load(tmp_path / "runs" / "pr", "pr").get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    run = Path(trial.user_attrs["run_dir"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "pruned" and summary["rounds_completed"] == 1
    for name in ("metrics.jsonl", "events.jsonl", "best.pt", "last.pt", "summary.md"):
        assert (run / name).is_file()


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("tuning.sampler=annealing", "tuning.sampler"),
        ("tuning.pruner=sometimes", "tuning.pruner"),
        ("tuning.prune_on=accuracy", "tuning.prune_on"),
        ("tuning.objectives=[best_map,bytes]", "cannot be pruned"),
        ("tuning.nope=1", "unknown setting"),
        ("tuning.space=/nowhere/space.yaml", "cannot read"),
        ("federation.clients=0", "federation.clients"),
    ],
)
def test_bad_settings_fail_in_one_line_before_any_trial(tmp_path, capsys, setting, words):
    assert main(["tune", *_args(tmp_path, "bad"), setting]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not (tmp_path / "runs" / "bad" / "trials").exists()


def test_a_pruned_study_runs_its_rounds_one_after_the_other_unless_told():
    from tuning.study import tuning_config

    assert "federation.overlap_eval=false" in tuning_config(["tuning.pruner=median"])[1]
    assert "federation.overlap_eval=false" not in tuning_config(["tuning.pruner=none"])[1]
    mine = tuning_config(["tuning.pruner=median", "federation.overlap_eval=true"])[1]
    assert mine == ["federation.overlap_eval=true"]


def test_a_threshold_in_map_is_not_applied_to_a_loss(tmp_path, capsys):
    args = [*_args(tmp_path, "thr"), "tuning.pruner=threshold", "tuning.prune_on=loss"]
    assert main(["tune", *args]) == 2
    assert "tuning.prune_on" in capsys.readouterr().err


def _record(rnd: int, losses: list[float], examples: list[int], map50_95: float = 0.0) -> dict:
    clients = [{"loss": v, "num_examples": n} for v, n in zip(losses, examples, strict=True)]
    return {"round": rnd, "map50_95": map50_95, "clients": clients}


def test_the_clients_loss_prunes_a_trial_whose_map_cannot_tell_yet():
    """Two trials both at mAP 0 (a detector from scratch): on mAP the median pruner cannot tell
    them apart; on the clients' training loss it prunes the one that learns more slowly."""
    from tuning.trials import LOSS_WEIGHT, _Pruning, pruning_value, round_loss

    assert round_loss(_record(1, [2.0, 5.0], [30, 10])) == pytest.approx(2.75)  # by examples
    assert round_loss(_record(1, [float("nan")], [10])) is None
    assert round_loss({"round": 1, "clients": []}) is None
    assert pruning_value("map+loss", 0.2, 5.0) == pytest.approx(0.2 - LOSS_WEIGHT * 5.0)
    assert pruning_value("map+loss", 0.2, None) is None and pruning_value("map", 0.2, None) == 0.2
    # a held-out mAP ahead by more than the loss's weight decides whatever the losses
    assert pruning_value("map+loss", 0.03, 15.0) > pruning_value("map+loss", 0.0, 4.0)

    def study(prune_on: str) -> list[str | None]:
        st = optuna.create_study(
            direction="maximize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
        )
        fast = _Pruning(st.ask(), prune_on)
        for rnd, loss in enumerate([9.0, 7.0, 6.0], start=1):
            assert fast.on_round(_record(rnd, [loss, loss], [20, 20])) is None
        st.tell(fast.trial, 0.1)
        slow = _Pruning(st.ask(), prune_on)
        return [slow.on_round(_record(rnd, [12.0, 13.0], [20, 20])) for rnd in (1, 2)]

    assert study("map") == [None, None]  # 0 is not below the median of 0
    assert study("loss") == ["pruned", "pruned"]
    assert study("map+loss") == ["pruned", "pruned"]  # equal mAPs: the loss decides
    nothing = _Pruning(optuna.create_study().ask(), "loss")
    assert nothing.on_round(_record(1, [], [])) is None  # no loss reported: nothing to judge


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"train.lr0": {"type": "float", "low": 0.1, "high": 0.01}}, "low < high"),
        ({"train.lr0": {"type": "float", "low": 0, "high": 1, "log": True}}, "log needs"),
        ({"strategy": {"type": "categorical", "choices": ["fedavg", "nope"]}}, "nope.yaml"),
        ({"train.nope": {"type": "int", "low": 1, "high": 3}}, "train.nope is not in the base"),
        ({"x.y": {"type": "float", "low": 0, "high": 1, "when": {"strategy": "fedprox"}}}, "when"),
        ({"train.lr0": {"type": "normal"}}, "type="),
    ],
)
def test_a_bad_space_fails_in_one_line(tmp_path, capsys, spec, words):
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump(spec))
    assert main(["tune", *_args(tmp_path, "bs"), f"tuning.space={space}"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err, err


def test_two_workers_share_one_study_and_run_disjoint_trials(tmp_path):
    args = _args(tmp_path, "par", "tuning.trials=4", "federation.rounds=1", "tuning.pruner=none")
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fl_server.cli", "tune", *args]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    second = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    assert first.wait(timeout=900) == 0 and second.wait(timeout=900) == 0
    trials = _load(tmp_path / "runs" / "par", "par").get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(dirs) == 4 and all((Path(d) / "summary.json").is_file() for d in dirs)


def test_a_retried_chain_counts_once():
    """Trial 0 died (stale), its retry 1 died too, retry 2 finished: one trial counts, plus any
    trial that failed for its own reasons (3) and one still waiting (4) does not."""
    from optuna.trial import TrialState

    from tuning.trials import counted

    study = optuna.create_study(direction="maximize")
    stale = {"fail_reason": "stale"}
    for state, attrs in [  # trials 0..3
        (TrialState.FAIL, stale),
        (TrialState.FAIL, {**stale, "failed_trial": 0, "retry_history": [0]}),
        (TrialState.COMPLETE, {"failed_trial": 0, "retry_history": [0, 1]}),
        (TrialState.FAIL, {}),
    ]:
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=0.5 if state == TrialState.COMPLETE else None,
                system_attrs=attrs,
            )
        )
    study.enqueue_trial({})
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert [t.number for t in counted(trials)] == [2, 3]


@pytest.mark.parametrize("sampler", ["tpe", "gp", "random"])
def test_every_sampler_walks_the_default_conditional_space(sampler):
    """The default space (conditional keys, a group choice, log and stepped ranges) through each
    sampler fedyolo offers for one objective: every trial gets the keys active for its strategy
    and only those (no federation is run: a toy objective of the chosen values)."""
    from omegaconf import OmegaConf

    from tuning.space import load_space, suggest
    from tuning.study import _sampler

    params = load_space("default")
    cfg = OmegaConf.create({"sampler": sampler, "seed": 0})
    study = optuna.create_study(sampler=_sampler(cfg), direction="maximize")
    seen = []

    def objective(trial):
        chosen = suggest(trial, params)
        seen.append(chosen)
        return -abs(chosen["train.lr0"] - 0.01) - 0.1 * (chosen["strategy"] == "fedadam")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=12)
    assert len(seen) == 12 and all(t.state.name == "COMPLETE" for t in study.trials)
    for chosen in seen:
        assert ("strategy.proximal_mu" in chosen) == (chosen["strategy"] == "fedprox")
        assert ("strategy.eta" in chosen) == (chosen["strategy"] in ("fedadam", "fedyogi"))
        assert 0.5 <= chosen["federation.fraction"] <= 1.0


def test_a_trial_asked_for_after_the_study_is_full_is_surplus_and_runs_nothing(tmp_path):
    """Workers on two hosts share an RDB storage but not the ask lock (a file): both saw one
    trial left and both asked. Counted after the trials exist, the later one is surplus on
    every worker: it fails without running a federation and does not count."""
    from omegaconf import OmegaConf
    from optuna.trial import TrialState

    from tuning.study import Claim, Study
    from tuning.trials import _objective, counted, surplus

    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.1))
    other_host = study.ask()  # trial 2: the last of 3, asked by the worker on the other host
    mine = study.ask()  # trial 3: asked here at the same moment
    trials = study.get_trials(deepcopy=False)
    assert not surplus(trials, other_host.number, 3) and surplus(trials, mine.number, 3)

    st = Study(tmp_path, study, OmegaConf.create({"trials": 3}), [], [])
    with pytest.raises(RuntimeError, match="surplus: the study already had its 3 trials"):
        _objective(st, mine, Claim(tmp_path), 3)  # before any federation: nothing ran
    study.tell(mine, state=TrialState.FAIL)
    assert [t.number for t in counted(study.get_trials(deepcopy=False))] == [0, 1, 2]
