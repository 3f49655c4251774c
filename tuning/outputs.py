"""What a person reads of a study: ``study.json``, ``summary.md``, ``best.yaml``, plots, ClearML.

Written after every trial (plots at the end), so a study stopped at any moment leaves its
results readable; the last worker to finish reports the study to ClearML as one task.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import yaml
from omegaconf import OmegaConf

from fl_client.lazy import lazy
from fl_server import config as config_mod
from fl_server import tracking
from fl_server.run_dir import RunDir
from tuning.study import Study

optuna = lazy("optuna")
matplotlib = lazy("matplotlib")
plt = lazy("matplotlib.pyplot")
ovm = lazy("optuna.visualization.matplotlib")

LOGGER = logging.getLogger("fedyolo")


def write_outputs(st: Study, plots: bool = False) -> None:
    study = st.optuna_study
    trials = study.get_trials(deepcopy=False)
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "values": t.values,
            "params": t.params,
            "overrides": t.user_attrs.get("overrides"),
            "rounds": t.user_attrs.get("rounds"),
            "seconds": t.user_attrs.get("seconds"),
            "run_dir": t.user_attrs.get("run_dir"),
            "fail_reason": t.user_attrs.get("fail_reason"),
            "clearml_task": t.user_attrs.get("clearml_task"),
        }
        for t in trials
    ]
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = _best(st, done)
    doc = {
        "study": study.study_name,
        "objectives": list(st.cfg.objectives),
        "directions": [d.name.lower() for d in study.directions],
        "base_overrides": st.base,
        "best": [
            {"number": t.number, "values": t.values, "overrides": t.user_attrs.get("overrides")}
            for t in best
        ],
        "trials": rows,
    }
    (st.folder / "study.json").write_text(json.dumps(doc, indent=1))
    if best:
        (st.folder / "best.yaml").write_text(
            yaml.safe_dump([*st.base, *best[0].user_attrs.get("overrides", [])])
        )
    (st.folder / "summary.md").write_text(_summary_md(st, rows, best))
    if plots and len(done) >= 2:
        _plots(st)


def _best(st: Study, done: list[Any]) -> list[Any]:
    if not done:
        return []
    if len(st.cfg.objectives) > 1:
        return list(st.optuna_study.best_trials)
    return [st.optuna_study.best_trial]


def _summary_md(st: Study, rows: list[dict], best: list[Any]) -> str:
    names = ", ".join(st.cfg.objectives)
    lines = [
        f"# Study {st.optuna_study.study_name}",
        "",
        f"Objectives: {names}. Trials: {len(rows)} of {st.cfg.trials}. Sampler "
        f"{st.cfg.sampler}, pruner {st.cfg.pruner}. Base: `{' '.join(st.base) or '(defaults)'}`.",
        "",
    ]
    if best:
        lines += [
            f"Best: trial {best[0].number}, {names} = {best[0].values}; run it again with",
            "",
            f"    fedyolo run --from {st.folder / 'best.yaml'}",
            "",
        ]
    lines += [
        "| trial | state | values | rounds | seconds | overrides |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        values = "" if r["values"] is None else ", ".join(f"{v:.4g}" for v in r["values"])
        ov = " ".join(r["overrides"] or []) or "(defaults)"
        note = f" ({r['fail_reason']})" if r["fail_reason"] else ""
        lines.append(
            f"| {r['number']} | {r['state']}{note} | {values} | {r['rounds'] or ''} | "
            f"{r['seconds'] or ''} | `{ov}` |"
        )
    return "\n".join(lines) + "\n"


def _plots(st: Study) -> None:
    """Optimization history and parameter importances (Pareto front when multi-objective)."""
    matplotlib.use("Agg")  # before pyplot loads (its first use below, through Optuna's plots)
    study = st.optuna_study
    plots = (
        {"pareto_front.png": ovm.plot_pareto_front}
        if len(st.cfg.objectives) > 1
        else {
            "optimization_history.png": ovm.plot_optimization_history,
            "param_importances.png": ovm.plot_param_importances,
        }
    )
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.savefig(st.folder / name, dpi=100, bbox_inches="tight")
            plt.close(fig)
        except Exception as e:  # noqa: BLE001 - a plot never costs the study
            LOGGER.warning("study plot %s not written: %s", name, e)


def report_study(st: Study) -> str | None:
    """One ClearML task for the study (type ``optimizer``, in the trials' project): each trial's
    values by trial number, the trials table with each federation's own task id, the best
    trial's parameters and values, and the plots. Same mode as the trials' tracking; offline, the
    session is in ``runs/<study>/clearml/`` for ``fedyolo clearml-import runs/<study>``. Never
    costs the study: an error is logged and the task id is None."""
    base = config_mod.compose(st.base)
    if not bool(base.tracking.enabled):
        return None
    doc = json.loads((st.folder / "study.json").read_text())
    here = RunDir(st.folder)  # sessions.json and the import use the same layout as a run's
    marker = st.folder / "clearml_task.json"  # the study's task, continued by a later run
    earlier = json.loads(marker.read_text()) if marker.is_file() else {}
    try:
        mode = tracking.resolve_mode(base.tracking, here)
        # online, a continued study reports into its task again; offline, ClearML cannot
        # continue a task, so the continuation is a new one naming the earlier one
        continued = earlier.get("task_id") if earlier.get("mode") == mode == "online" else False
        name = doc["study"]
        if earlier.get("task_id") and not continued:
            name += f" (continued from {earlier['task_id']})"
        task = tracking.open_task(
            here, mode, str(base.tracking.project), name, task_type="optimizer",
            continue_task=continued,
        )  # fmt: skip
        task.connect(OmegaConf.to_container(st.cfg, resolve=True), name="tuning")
        log = task.get_logger()
        for row in doc["trials"]:
            for name, value in zip(doc["objectives"], row["values"] or [], strict=False):
                log.report_scalar("trials", name, float(value), iteration=int(row["number"]))
        head = ["trial", "state", *doc["objectives"], "rounds", "seconds", "task", "overrides"]
        table = [head] + [
            [
                r["number"],
                r["state"],
                *(r["values"] or [""] * len(doc["objectives"])),
                r["rounds"] or "",
                r["seconds"] or "",
                r["clearml_task"] or "",
                " ".join(r["overrides"] or []),
            ]
            for r in doc["trials"]
        ]
        log.report_table("trials", "all", iteration=0, table_plot=table)
        if doc["best"]:
            best = doc["best"][0]
            task.connect({"overrides": best["overrides"], "trial": best["number"]}, name="best")
            for name, value in zip(doc["objectives"], best["values"], strict=False):
                log.report_single_value(f"best {name}", float(value))
        for png in sorted(st.folder.glob("*.png")):
            log.report_image("study", png.stem, iteration=0, local_path=str(png))
        tracking.close_task(here, task, mode)
        task_id = str(task.id)
        marker.write_text(json.dumps({"task_id": task_id, "mode": mode}))
        LOGGER.info("study %s: ClearML %s task %s", doc["study"], mode, task_id)
        return task_id
    except Exception as e:  # noqa: BLE001 - tracking never costs the study
        LOGGER.warning("ClearML study task not written: %s: %s", type(e).__name__, e)
        return None
