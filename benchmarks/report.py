"""The benchmark tables, rendered from ``benchmarks/results/*.json``.

One renderer per results file, so the numbers in the documentation are the JSON's and cannot
drift: ``docs/hooks.py`` puts ``SECTIONS[name]()`` where the benchmarks page says
``<!-- benchmark: name -->``; ``.venv/bin/python benchmarks/report.py [name ...]`` prints them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

Section = Callable[[], list[str]]

RESULTS = Path(__file__).resolve().parent / "results"


def from_results(name: str) -> Callable[[Callable[[Path, dict], list[str]]], Section]:
    """A section rendered from ``results/<name>``: the renderer gets the file's path and its
    parsed JSON; while the benchmark has not been run (no file) the section is empty."""

    def wrap(render_file: Callable[[Path, dict], list[str]]) -> Section:
        @functools.wraps(render_file)
        def section() -> list[str]:
            path = RESULTS / name
            if not path.exists():
                return []
            return render_file(path, json.loads(path.read_text()))

        return section

    return wrap


def fed_vs_central() -> list[str]:
    lines = []
    for path in sorted(RESULTS.glob("fed_vs_central_b*.json")):
        d = json.loads(path.read_text())
        s = d["setup"]
        lines += [
            f"**Federated vs centralized** (`{path.name}`; {d['machine']}; {d['date']}): "
            f"{s['model']}, {s['clients']} clients, {s['images']} synthetic images at "
            f"{s['imgsz']} px, the same epoch budget for both.",
            "",
            "| split | epochs | local epochs × rounds | federated final | federated best round "
            "| centralized | ratio (final) |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for r in d["rows"]:
            budget = r.get("epoch_budget", r["rounds"])
            local = r.get("local_epochs", 1)
            lines.append(
                f"| {r['split']} | {budget} | {local} × {r['rounds']} "
                f"| {r['federated_final_map50_95']:.3f} | {r['federated_best_map50_95']:.3f} "
                f"| {r['centralized_map50_95']:.3f} | **{r['ratio_final']:.2f}** |"
            )
        lines.append("")
    return lines


def _mean_sd(values: list[float]) -> str:
    """``mean ± sd`` (sample sd) of ``values``, or the value alone for one."""
    import statistics

    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


@from_results("fed_vs_central_seeds.json")
def fed_vs_central_seeds(path: Path, d: dict) -> list[str]:
    """Every configuration tried against the same seeds' centralized models."""
    s = d["setup"]
    groups: dict[tuple, list[dict]] = {}
    for r in d["rows"]:
        key = (r["split"], r["epoch_budget"], r["label"], r["local_epochs"], r["rounds"])
        groups.setdefault(key, []).append(r)
    lines = [
        f"**Federated vs centralized over seeds** (`{path.name}`; {d['machine']}; {d['date']}): "
        f"{s['model']}, {s['clients']} clients, {s['images']} synthetic images at {s['imgsz']} px; "
        "each seed's federation against the centralized model of the same seed and training "
        "images, trained for the same number of epochs with the base hyper-parameters and the "
        "federation's learning-rate schedule (`train.lr_schedule`; the last column: against the "
        "constant-rate centralized model, where the federation decays its rate).",
        "",
        "| split | epochs | configuration | local epochs × rounds | seeds | federated final "
        "| centralized | ratio per seed | ratio (mean ± sd) | vs constant-rate centralized |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for (split, budget, label, local, rounds), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["seed"])
        ratios = [r["ratio_final"] for r in rows]
        const = [r["ratio_vs_constant_central"] for r in rows if "ratio_vs_constant_central" in r]
        decayed = any(r.get("lr_schedule", "constant") != "constant" for r in rows)
        # "=": a constant rate, nothing to set against; n/a: no constant-rate model was trained
        vs_const = (_mean_sd(const) if len(const) == len(rows) else "n/a") if decayed else "="
        lines.append(
            f"| {split} | {budget} | {label}: `{d['configs'][label]}` | {local} × {rounds} "
            f"| {','.join(str(r['seed']) for r in rows)} "
            f"| {_mean_sd([r['federated_final_map50_95'] for r in rows])} "
            f"| {_mean_sd([r['centralized_map50_95'] for r in rows])} "
            f"| {' / '.join(f'{x:.2f}' for x in ratios)} | **{_mean_sd(ratios)}** "
            f"| {vs_const} |"
        )
    elsewhere: dict[str, list[str]] = {}
    for r in d["rows"]:
        if r.get("machine", d["machine"]) != d["machine"]:
            elsewhere.setdefault(r["machine"], []).append(f"{r['label']} {r['split']} s{r['seed']}")
    lines += [f"\nMeasured on {m}: {', '.join(rs)}." for m, rs in elsewhere.items()]
    return [*lines, "", *_fvc_standing(groups, d["configs"]), "", *_fvc_paired(groups), ""]


FVC_TARGETS = {"iid": 0.95, "domain": 0.90}  # issue 33 item 5: the mean ratio over >= 3 seeds


def _fvc_standing(groups: dict[tuple, list[dict]], configs: dict[str, str]) -> list[str]:
    """Per split, the best configuration at the longest budget over 3 or more seeds (by mean
    ratio) against issue 33's target, with its lowest seed."""
    import statistics

    budget = max(key[1] for key in groups)
    lines = [f"**Where it stands at {budget} epochs** (configurations run on 3 or more seeds):", ""]
    for split, target in FVC_TARGETS.items():
        tried = {k: v for k, v in groups.items() if k[:2] == (split, budget) and len(v) >= 3}
        if not tried:
            continue
        (_, _, label, local, rounds), rows = max(
            tried.items(), key=lambda kv: statistics.mean(r["ratio_final"] for r in kv[1])
        )
        ratios = [r["ratio_final"] for r in rows]
        mean = statistics.mean(ratios)
        sem = statistics.stdev(ratios) / len(ratios) ** 0.5
        lines.append(
            f"- {split}: `{configs[label]}` at {local} × {rounds}, {len(rows)} seeds: ratio "
            f"{mean:.3f} (standard error {sem:.3f}, lowest seed {min(ratios):.2f}, "
            f"{sum(x >= target for x in ratios)} of {len(ratios)} seeds at or above "
            f"{target:.2f}): target ≥ {target:.2f} **{'met' if mean >= target else 'not met'}**"
        )
    return lines


# configuration -> the one it changes by one setting, for the paired comparison
FVC_BASES = {
    "linear": ("fedavg", "the linear decay"),
    "linear-keep-momentum": ("linear", "kept momentum"),
    "linear-e1-keep-momentum": ("linear-e1", "kept momentum"),
    "pooled-linear": ("linear", "pooled BN statistics"),
    "pooled-linear-keep-momentum": ("pooled-linear", "kept momentum"),
    "linear-lr0.04": ("linear", "lr0 0.04"),
    "linear-batch4": ("linear", "batch 4"),
    "linear-fedavgm-0.5": ("linear", "server momentum 0.5"),
    "linear-keep-momentum-lr0.015": ("linear-keep-momentum", "lr0 0.015"),
    "linear-fleet-momentum": ("linear-keep-momentum", "fleet-mean momentum (an experiment)"),
}


def _fvc_paired(groups: dict[tuple, list[dict]]) -> list[str]:
    """Each change against its base on the seeds both ran: the difference of the federated
    models' mAP50-95, seed by seed (the same shards and the same centralized model, so neither
    the seed's data nor the centralized run's noise enters it)."""
    import statistics

    lines = [
        "**Paired by seed** (the change's federated mAP50-95 minus its base's, on the seeds "
        "both ran, at the same split, budget and local epochs × rounds):",
        "",
        "| split | epochs | change | base → configuration | local epochs × rounds | seeds "
        "| Δ per seed | Δ mean (standard error) | seeds better |",
        "|---|---:|---|---|---|---|---|---:|---:|",
    ]
    for (split, budget, label, local, rounds), rows in sorted(groups.items()):
        if label not in FVC_BASES:
            continue
        base_label, change = FVC_BASES[label]
        base = {r["seed"]: r for r in groups.get((split, budget, base_label, local, rounds), [])}
        pairs = [(r["seed"], r, base[r["seed"]]) for r in rows if r["seed"] in base]
        if len(pairs) < 2:
            continue
        pairs.sort(key=lambda p: p[0])
        delta = [r["federated_final_map50_95"] - b["federated_final_map50_95"] for _, r, b in pairs]
        sem = statistics.stdev(delta) / len(delta) ** 0.5
        lines.append(
            f"| {split} | {budget} | {change} | {base_label} → {label} | {local} × {rounds} "
            f"| {','.join(str(seed) for seed, _, _ in pairs)} "
            f"| {' / '.join(f'{x:+.3f}' for x in delta)} "
            f"| **{statistics.mean(delta):+.4f}** ({sem:.4f}) "
            f"| {sum(x > 0 for x in delta)} of {len(delta)} |"
        )
    return lines


ROUND_SETUPS = {  # engines of round_overhead.json → how the table names them
    "simulation": "simulation (overlapped evaluation, default)",
    "simulation-sequential": "simulation, `federation.overlap_eval=false`",
    "local-deployment": "local-deployment (warm worker, default)",
    "local-deployment-cold": "local-deployment, `engine.warm_worker=false`",
    "compose": "compose (warm worker, default)",
}


def _round_label(v: dict, label: str) -> str:
    """Another Flower build or poll settings (``round_overhead.py --label``), as they ran."""
    env = ", ".join(f"`{k}={x}`" for k, x in v.get("environment", {}).items())
    return f"flwr {v.get('flwr', '?')}" + (f" with {env}" if env else f" ({label})")


@from_results("round_overhead.json")
def round_overhead(path: Path, d: dict) -> list[str]:
    engines = d["engines"]
    dates = ", ".join(sorted({v["date"] for v in engines.values()}))
    counts = ", ".join(f"{len(v['rounds'])} in {k}" for k, v in engines.items())
    machines = list(dict.fromkeys(v["machine"] for v in engines.values()))  # each entry's own
    cpus = {m: chr(ord("A") + i) for i, m in enumerate(machines)} if len(machines) > 1 else {}
    where = "; ".join(f"{cpus[m]}: {m}" if cpus else m for m in machines)
    lines = [
        f"**Where a round goes** (`{path.name}`; {where}; {dates}): yolov8n, "
        "2 clients × ~245 images at 128 px; local work = each client's local epochs × batch "
        "per round (1 × 16 where the entry does not say: the benchmark's pinned work); mean of "
        "rounds 2..n (rounds: "
        f"{counts}); a round's time runs from the previous round's record to its own, and "
        "where the evaluation is overlapped (`federation.overlap_eval`, the default) that "
        "interval holds the next round's training, so rounds 2..n-1 are each set against the "
        "training of the round after them. Training = the slowest client's time inside "
        "Ultralytics' epoch loop; "
        "ClientApp start = a message's `flwr-clientapp` process, from its creation to "
        "fedyolo's handler.",
        "",
        "| setup | local work | round (s) | training (s) | server eval (s) | client set-up (s) "
        "| ClientApp start (s) | everything else | round 1 (s) |" + (" machine |" if cpus else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if cpus else ""),
    ]
    for engine, v in engines.items():
        s = v["steady_state_rounds_2_to_n"]
        start = s.get("client_startup_seconds", 0.0)
        setup, _, label = engine.partition("@")
        name = ROUND_SETUPS.get(setup, setup) + (f", {_round_label(v, label)}" if label else "")
        work = v.get("local_work", {"epochs": 1, "batch": 16})
        lines.append(
            f"| {name} | {work['epochs']} × {work['batch']} | {s['round_seconds']:.1f} "
            f"| {s['training_seconds']:.1f} | {s['eval_seconds']:.1f} "
            f"| {s['client_setup_seconds']:.2f} | {start:.1f} "
            f"| **{100 * s['other_share']:.0f}%** | {v['round_1']['round_seconds']:.1f} |"
            + (f" {cpus[v['machine']]} |" if cpus else "")
        )
    return [*lines, ""]


def _cold_start(path: Path, d: dict) -> list[str]:
    m = d["median_seconds"]
    return [
        f"**Client cold start** (`{path.name}`; {d['machine']}; {d['date']}): fresh process → "
        f"first training batch, {d['model']} at {d['imgsz']} px, median of "
        f"{len(d['samples'])}, seconds since process creation: interpreter up at "
        f"{m['interpreter']:.1f}, imports (Flower, torch; Ultralytics comes with the first "
        f"training) done at {m['imports']:.1f}, "
        f"model built at {m['model']:.1f}, **first batch at {m['first_batch']:.1f}** "
        f"(target {d['target_seconds']:.0f} s)." + _cold_container(d) + _cold_prestarted(d),
        "",
    ]


def _cold_prestarted(d: dict) -> str:
    if "prestarted" not in d:
        return ""
    p = d["prestarted"]
    m = p["median_seconds"]
    return (
        f" **With the node's spare warm worker started with the node** (what `deploy.supernode` "
        f"and the local deployment do), a fresh `flwr-clientapp`-like process reaches the first "
        f"batch **{m['first_batch']:.1f} s** after its creation (median of {len(p['samples'])}); "
        f"the spare itself took {m['spare_ready']:.1f} s from its spawn to listening warm, "
        f"while the node connects. A message already waiting when the node starts (joining a "
        f"federation under way) reaches the first batch "
        f"{m['node_start_to_first_batch']:.1f} s after the spare's spawn."
    )


cold_start = from_results("cold_start.json")(_cold_start)
cold_start_avx2 = from_results("cold_start_avx2.json")(_cold_start)  # the same, another CPU
cold_start_zen4 = from_results("cold_start_zen4.json")(_cold_start)  # and a third


def _cold_container(d: dict) -> str:
    c = d.get("container")
    if not c:
        return ""
    m = c["median_seconds"]
    return (
        f" Inside the client image (`{c['image']}`, built from {c['revision'][:7]}; the shard "
        f"mounted read-only), median of {len(c['samples'])}: imports done at "
        f"{m['imports']:.1f}, model at {m['model']:.1f}, **first batch at "
        f"{m['first_batch']:.1f}**."
    )


@from_results("scale.json")
def scale(path: Path, d: dict) -> list[str]:
    rows = {r["setup"]: r for r in d["rows"]}

    def num(v, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = [
        f"**Fleet scale** (`{path.name}`, `scale.png`; {d['machine']}; {d.get('date', '')}): "
        "6 images per client, 48 held-out images at every size; medians over rounds 2..n. "
        "Server eval: the held-out evaluation a round; client train: one client's training a "
        "round. Server RSS: the `fedyolo run` process (in simulation also Ray's driver) after "
        "round 1 and after the last; client RSS: the largest peak of a process that trained (a "
        "simulation actor serves many clients). Bytes: all clients of a round together.",
        "",
        "| setup | model, px | engine | clients | sampled | rounds | status | round (s) "
        "| server eval (s) | client train (s) | aggregate (s) | contribution (s) "
        "| server RSS first → last (MiB) | client RSS max (MiB) | MB up / down a round |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, r in rows.items():
        model = str(r.get("model", "")).removesuffix(".yaml").replace("fedyolo-", "")
        lines.append(
            f"| {name} | {model}, {r.get('imgsz', '')} | {r['engine']} | {r['clients']} "
            f"| {r['sampled_per_round']} "
            f"| {r['rounds']} | {r['status']} | {num(r.get('round_seconds_median'), '.2f')} "
            f"| {num(r.get('eval_seconds_median'), '.2f')} "
            f"| {num(r.get('client_train_seconds_median'), '.2f')} "
            f"| {num(r.get('aggregate_seconds_median'), '.3f')} "
            f"| {num(r.get('contribution_seconds_median'), '.2f')} "
            f"| {num(r.get('server_rss_mb_first'), '.0f')} → "
            f"{num(r.get('server_rss_mb_last'), '.0f')} "
            f"| {num(r.get('client_rss_mb_max'), '.0f')} "
            f"| {num((r.get('bytes_up_per_round') or 0) / 1e6, '.1f')} / "
            f"{num((r.get('bytes_down_per_round') or 0) / 1e6, '.1f')} |"
        )
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for key, t in d.get("targets", {}).items():
        met = {True: "**met**", False: "**not met**", None: "not measured"}[t.get("pass")]
        value = t.get("value")
        shown = num(value, ".2f") if isinstance(value, int | float) else str(value)
        lines.append(f"| {d.get('target_text', {}).get(key, key)} | {shown} | {met} |")
    return [*lines, ""]


@from_results("strategies_noniid.json")
def strategies_noniid(path: Path, d: dict) -> list[str]:
    s = d["setup"]
    parts = list(dict.fromkeys(r["partition"] for r in d["rows"]))
    names = list(dict.fromkeys(r["strategy"] for r in d["rows"]))
    cell = {(r["partition"], r["strategy"]): r for r in d["rows"]}
    lines = [
        f"**Strategies × partitions** (`{path.name}`; {d['machine']}; {d['date']}): "
        f"{s['model']}, {s['clients']} clients, {s['images']} synthetic images at {s['imgsz']} "
        f"px, {s['rounds']} rounds × {s['local_epochs']} local epochs, one seed. Each cell: "
        "final mAP50-95 / as a share of centralized (same epochs, same data) / first round "
        "at ≥ 90% of centralized (– = never).",
        "",
        "| strategy | " + " | ".join(parts) + " |",
        "|---|" + "---:|" * len(parts),
        "| centralized | "
        + " | ".join(f"{d['centralized'][p]['map50_95']:.3f}" for p in parts)
        + " |",
    ]
    for n in names:
        cells = []
        for p in parts:
            r = cell.get((p, n))
            if r is None:
                cells.append("")
                continue
            at = r["rounds_to_90pct_central"]
            cells.append(
                f"{r['final_map50_95']:.3f} / {r['ratio_final']:.2f} / {at if at else '–'}"
            )
        lines.append(f"| {n} (`{s['strategies'][n]}`) | " + " | ".join(cells) + " |")
    return [*lines, ""]


@from_results("transport.json")
def transport(path: Path, d: dict) -> list[str]:
    s = d["setup"]
    lines = [
        f"**Transport** (`{path.name}`; {d['machine']}; rows measured {_dates(d)}): FedAvg, "
        f"{s['model']}, {s['clients']} clients, {s['partition']} split, {s['rounds']} rounds × "
        f"{s['local_epochs']} local epochs. Bytes: the serialized Flower message per client per "
        "round, from `metrics.jsonl`; down after round 1: the mean of rounds 2..n (q4z sends "
        "the model whole in round 1). Change vs fp32: against the fp32 seed-0 run measured the "
        "same day.",
        "",
        "| transport | MB up / client / round | fewer bytes up than fp32 | MB down "
        "| MB down after round 1 | fewer bytes down | final mAP50-95 | change vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        after = r.get("bytes_down_after_first_round")
        lines.append(
            f"| {r['transport']} | {r['bytes_up_per_client_round'] / 1e6:.2f} "
            f"| {r.get('bytes_up_reduction', float('nan')):.1f}× "
            f"| {r['bytes_down_per_client_round'] / 1e6:.2f} "
            f"| {'—' if after is None else format(after / 1e6, '.2f')} "
            f"| {_down_reduction(r)} | {r['final_map50_95']:.3f} "
            f"| {100 * r.get('map_rel_change', float('nan')):+.1f}% |"
        )
    t = d.get("targets") or {}
    if t:
        low, high = t["fp32_final_range"]
        finals = ", ".join(f"{v:.3f}" for v in t["q4z_finals"])
        lines += [
            "",
            f"Targets (issue 32): ≥ 8× fewer bytes both ways: up {t['up_reduction_min']:.1f}×, "
            f"down {t['down_reduction_after_first_round_min']:.1f}× after round 1 "
            f"({t['down_reduction_run_mean_min']:.1f}× over the whole run) — "
            f"{'**met**' if t['met_8x_both_ways'] else '**not met**'}; q4z's final mAP50-95 "
            f"({finals}) inside the fp32 seeds' range [{low:.3f}, {high:.3f}] — "
            f"{'**met**' if t['q4z_inside_fp32_range'] else '**not met**'}"
            + (
                " (none below it)"
                if not t["q4z_inside_fp32_range"] and t["q4z_at_least_fp32_low"]
                else ""
            )
            + ".",
        ]
    return [*lines, ""]


def _dates(d: dict) -> str:
    dates = sorted({r.get("measured", d["date"]) for r in d["rows"]})
    return " and ".join(dates)


def _down_reduction(r: dict) -> str:
    after = r.get("bytes_down_reduction_after_first_round")
    whole = r.get("bytes_down_reduction")
    if whole is None:
        return "—"
    if after is None or abs(after - whole) < 0.05:
        return f"{whole:.1f}×"
    return f"{after:.1f}× after round 1 ({whole:.1f}× run)"


def _listing(items) -> str:
    """A table cell: the items joined by commas, or "none"."""
    return ", ".join(items) or "none"


@from_results("faults.json")
def faults(path: Path, d: dict) -> list[str]:
    s = d["setup"]
    w = d["warmup"]
    lines = [
        f"**Faults** (`{path.name}`; {d['machine']}; {d['date']}): yolov8n, 4 clients, iid, "
        f"{s['rounds']} rounds × {s['local_epochs']} local epoch, warm-started from an honest "
        f"run's best.pt (mAP50-95 {w['best']['map50_95']:.3f}); round timeout 120 s."
        + "".join(
            f" {r['run']} re-run {r['date']}."
            for r in d["rows"]
            if r.get("date", d["date"]) != d["date"]
        ),
        "",
        "| run | faults injected | survived | rounds lost | rollbacks (correct) | false triggers "
        "| drops on probation (round) | server killed + resumed "
        "| clients flagged (replayed: round, client) | honest flagged | final mAP50-95 |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in d["rows"]:
        replayed, honest = r.get("flags_replayed"), r.get("honest_flags_replayed")
        held = r.get("drops_on_probation")  # None: run before guard.patience
        flags = (
            "matches not kept" if replayed is None else _listing(f"{a}: {b}" for a, b in replayed)
        )
        lines.append(
            f"| {r['run']} | {r['faults_injected']} | {r['faults_survived']} "
            f"| {r['rounds_lost']} | {len(r['rollbacks'])} ({len(r['rollbacks_correct'])}) "
            f"| {len(r['false_triggers'])} "
            f"| {'—' if held is None else _listing(map(str, held))} | {r['resumes']} | {flags} "
            f"| {'—' if honest is None else len(honest)} | {r['final']['map50_95']:.3f} |"
        )
    lines += [
        "",
        "| run | round | client | fault | what happened | mAP50-95 before → after |",
        "|---|---:|---:|---|---|---|",
    ]
    for r in d["rows"]:
        for f in r["faults"]:
            lines.append(
                f"| {r['run']} | {f['round']} | {f['client']} | {f['kind']} | {f['handled']} "
                f"| {f['map50_95_before']:.3f} → {f['map50_95']:.3f} |"
            )
    return [*lines, ""]


@from_results("guard_replay.json")
def guard_replay(path: Path, d: dict) -> list[str]:
    lines = [
        f"**Drift guard on honest runs** (`{path.name}`; {d['date']}): the guard's rule replayed "
        f"on {d['rows'][0]['runs']} honest runs' held-out curves ({d['rounds_replayed']} rounds, "
        "no fault injected; curves kept in the JSON); a run counts once, at its first rollback. "
        "Patience 0: every drop rolls back at once (the guard before `guard.patience`); 1: "
        "today's default (a drop below `guard.severe_drop` must last two rounds).",
        "",
        "| max_drop | min_abs_drop | patience | runs that would roll back "
        "| first rollback (run: round) |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in d["rows"]:
        first = _listing(f"{k}: {v}" for k, v in r["first_triggers"].items())
        lines.append(
            f"| {r['max_drop']:.2f} | {r['min_abs_drop']:.2f} | {r.get('patience', 0)} "
            f"| {r['runs_with_false_trigger']}/{r['runs']} | {first} |"
        )
    for r in d.get("weight_fault_rows") or []:
        lines += [
            "",
            f"Weight faults of `faults.json` ({r['run']}) replayed with today's defaults: faults "
            f"in rounds {_listing(map(str, r['weight_fault_rounds']))}, rolled back at once in "
            f"rounds {_listing(map(str, r['rolled_back_at']))}.",
        ]
    sig = d.get("significance_rows") or []
    if sig:
        lines += [
            "",
            f"The whole guard, significance test included, on the {sig[0]['runs']} honest runs "
            "that kept their per-image matches (a run replayed on an earlier date whose "
            "directory is gone is kept as it was, where the setting was replayed then: * marks "
            "it); a run counts once, at its first rollback (the lower bound of the drop in "
            "brackets).",
            "",
            "| max_drop | min_abs_drop | significance | patience | runs that would roll back "
            "| first rollback (run: round [lower bound]) | rule fired, within noise "
            "| on probation (run: rounds) |",
            "|---:|---:|---|---:|---:|---|---:|---|",
        ]
    for r in sig:
        first = _listing(
            f"{k}{'*' if v.get('kept_from') else ''}: {v['rollback']}"
            + (f" [{v['drop_ci']['low']:+.3f}]" if v.get("drop_ci") else "")
            for k, v in r["per_run"].items()
            if v["rollback"] is not None
        )
        noise = sum(len(v["within_noise"]) for v in r["per_run"].values())
        held = _listing(
            f"{k}: {', '.join(str(p['round']) for p in v['probation'])}"
            for k, v in r["per_run"].items()
            if v.get("probation")
        )
        lines.append(
            f"| {r['max_drop']:.2f} | {r['min_abs_drop']:.2f} | {r['significance'] or 'off'} "
            f"| {r.get('patience', 0)} | {r['runs_with_false_rollback']}/{r['runs']} | {first} "
            f"| {noise} | {held} |"
        )
    contrib = d.get("contribution_rows") or []
    if contrib:
        lines += [
            "",
            "`guard.contribution`'s flag rule replayed on the honest runs that scored every "
            "client (every flag is an honest client flagged), with today's rule and with "
            "leave-one-out alone (`guard.flag_agreement=null`, the rule before it):",
            "",
            "| run | rounds scored | honest flags | honest flags, leave-one-out alone (round: "
            "client, two-round gain, class-branch agreement, mAP50-95) |",
            "|---|---:|---|---|",
        ]

    def flagged(flags: list[dict]) -> str:
        return _listing(
            f"{f['round']}: {f['client']}, {f['gain_2']:+.3f}, "
            + ("—" if f.get("agreement") is None else f"{f['agreement']:+.2f}")
            + f", {f['map50_95']:.3f}"
            for f in flags
        )

    for r in contrib:
        alone = r.get("honest_flags_loo_alone")
        lines.append(
            f"| {r['run']} | {r['rounds']} | {flagged(r['honest_flags'])} "
            f"| {'—' if alone is None else flagged(alone)} |"
        )
    return [*lines, ""]


EDGE_MODELS = {  # bench names in edge.json → how the table names them
    "best.pt": "PyTorch `best.pt`",
    "onnx-fp32": "ONNX fp32",
    "onnx-fp16": "ONNX fp16",
    "onnx-int8-u8": "ONNX INT8 u8 (chosen)",
    "onnx-int8-s8": "ONNX INT8 s8 (exporter's default)",
    "onnx-fp32 · openvino": "ONNX fp32, in OpenVINO",
    "onnx-int8-u8 · openvino": "ONNX INT8 u8, in OpenVINO",
    "openvino-fp32": "OpenVINO bundle (`format=openvino`)",
}


def _edge(path: Path, d: dict) -> list[str]:
    b = d["bench"]
    at = {(r["model"], r["imgsz"], r["threads"]): r for r in b["results"]}
    lines = [
        f"**To the edge: export, INT8, latency** (`{path.name}`; {d['machine']}, ONNX Runtime "
        f"{b['machine']['onnxruntime']}"
        + (f", OpenVINO {b['machine']['openvino']}" if b["machine"].get("openvino") else "")
        + f"; {d['date']}): the YOLOv8n of `runs/{Path(d['run']).name}` (synthetic "
        f"fleet at 320 px, {_setting(d['train'], 'federation.rounds')} rounds), exported by "
        f"`fedyolo export` at {_sizes(b)} px; latency of the model "
        "alone (1×3×S×S input to raw outputs), "
        f"{b['results'][0]['runs']} runs, each model in its own process; mAP50-95 on the "
        "held-out images through Ultralytics' validator on each file.",
        "",
        "| model | size MB | mAP50-95 @320 | p50 ms @320, 1 / 2 threads | p95 ms @320, 2 threads "
        "| p50 ms @640, 1 / 2 threads | peak RSS MB @320 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, label in EDGE_MODELS.items():
        one, two = at.get((model, 320, 1)), at.get((model, 320, 2))
        big1, big2 = at.get((model, 640, 1)), at.get((model, 640, 2))
        if one is None or two is None:
            continue
        big = f"{big1['p50_ms']:.1f} / {big2['p50_ms']:.1f}" if big1 and big2 else ""
        if two.get("precision"):  # OpenVINO's own choice of inference precision
            label += f" ({two['precision']})"
        lines.append(
            f"| {label} | {two['size_mb']:.2f} | {two['map50_95']:.4f} "
            f"| {one['p50_ms']:.1f} / {two['p50_ms']:.1f} | {two['p95_ms']:.1f} | {big} "
            f"| {two['peak_rss_mb']:.0f} |"
        )
    return [*lines, ""]


edge = from_results("edge.json")(_edge)
# the same pipeline on a CPU with AVX2 only (no AVX-512, VNNI or AMX): where INT8 kernels differ
edge_avx2 = from_results("edge_avx2.json")(_edge)
# and on an AMD EPYC with AVX-512 VNNI and BF16 (Zen 4; no AMX)
edge_zen4 = from_results("edge_zen4.json")(_edge)


def _int8_profile(path: Path, d: dict) -> list[str]:
    prof, p50 = d["profile"], d["p50_ms"]
    fp32, int8 = prof["fp32"]["by_op"], prof["int8"]["by_op"]
    conv = fp32.get("Conv", {}).get("ms", 0.0)
    qconv = int8.get("QLinearConv", {}).get("ms", 0.0)
    layers = list(prof["fp32"]["by_conv_layer"].items())[:4]
    paired = ", ".join(
        f"`{name}` {ms:.2f} → {prof['int8']['by_conv_layer'].get(name, float('nan')):.2f}"
        for name, ms in layers
    )
    lines = [
        f"**Where INT8 time goes** (`{path.name}`; {d['machine']}, ONNX Runtime "
        f"{d['onnxruntime']}; {d['date']}): ONNX Runtime's profiler on the edge benchmark's fp32 "
        f"and INT8 (u8) files at {d['imgsz']} px, {d['threads']} threads, {d['runs']} runs; p50 "
        f"without the profiler {p50['fp32']:.1f} ms (fp32) and {p50['int8']:.1f} ms (INT8). "
        f"Convolutions take {conv:.1f} ms of fp32's {prof['fp32']['kernels_ms']:.1f} ms of "
        f"kernels and {qconv:.1f} ms of INT8's {prof['int8']['kernels_ms']:.1f} ms; the "
        f"slowest layers, fp32 → INT8 ms: {paired}. Below, the fp32 file re-quantized with the "
        "settings that pick the INT8 kernels (calibrated on random images: speed only), each "
        "timed against the fp32 file in alternation.",
        "",
        "| quantizer | fp32 p50 ms | INT8 p50 ms | INT8 faster |",
        "|---|---:|---:|---:|",
    ]
    for r in d["quantizers"]:
        lines.append(
            f"| {r['quantizer']} | {r['fp32_p50_ms']:.1f} | {r['int8_p50_ms']:.1f} "
            f"| {r['faster_x']:.2f}× |"
        )
    rw = d.get("decode_rewrite") or {}
    if "faster_x" in rw:
        lines += [
            "",
            "**The decode's softmax on the last axis** (`dfl_last_axis`, what `fedyolo export` "
            "does to an ONNX file since 2026-12-06): the fp32 file with DFL's softmax over the "
            f"last axis and its 1×1 convolution as a MatMul: p50 {rw['fp32_p50_ms']:.1f} → "
            f"**{rw['rewritten_p50_ms']:.1f} ms ({rw['faster_x']:.2f}×)** in alternation, "
            f"outputs differing by at most {rw['max_abs_output_difference']:.1g}.",
        ]
    return [*lines, ""]


int8_profile_avx2 = from_results("int8_profile_avx2.json")(_int8_profile)
int8_profile_zen4 = from_results("int8_profile_zen4.json")(_int8_profile)


def _setting(overrides: list[str], key: str) -> str:
    """The value ``key=...`` has in a list of overrides, or '?'."""
    return next((o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")), "?")


def _sizes(bench: dict) -> str:
    return " and ".join(str(s) for s in sorted({r["imgsz"] for r in bench["results"]}))


@from_results("distill.json")
def distill(path: Path, d: dict) -> list[str]:
    s, m = d["setup"], d["summary"]
    lines = [
        f"**Federated distillation** (`{path.name}`; {d['machine']}; {d['date']}): per seed, a "
        f"{s['teacher']} teacher trained federatedly ({s['rounds']} rounds), then "
        f"{s['student']} trained identically without and with `distill.teacher` = that "
        "teacher's `best.pt` (same data version, asserted); best held-out mAP50-95 over the "
        "rounds.",
        "",
        "| seed | teacher | student | student distilled | gap closed |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        t, p, x = (r[k]["best_map50_95"] for k in ("teacher", "plain", "distilled"))
        closed = f"{100 * (x - p) / (t - p):.0f}%" if t != p else "—"
        lines.append(f"| {r['seed']} | {t:.4f} | {p:.4f} | {x:.4f} | {closed} |")
    lines.append(
        f"| mean ± sd | {m['teacher_mean']:.4f} ± {m['teacher_sd']:.4f} "
        f"| {m['plain_mean']:.4f} ± {m['plain_sd']:.4f} "
        f"| {m['distilled_mean']:.4f} ± {m['distilled_sd']:.4f} "
        f"| **{100 * m['gap_closed']:.0f}%** |"
    )
    return [*lines, ""]


@from_results("norm_replay.json")
def norm_replay(path: Path, d: dict) -> list[str]:
    lines = [
        f"**Update-norm rules on honest runs** (`{path.name}`; {d['machine']}; {d['date']}): "
        f"the rules replayed on the server-measured norms of {d['runs']} honest runs with 3+ "
        f"replies ({d['rounds']} rounds). ×10: each reply in turn scaled by 10 with the "
        "round's median recomputed.",
        "",
        "| rule | limit × median | honest replies dropped | ×10 updates dropped "
        "| largest honest ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"per_step": "norm per batch", "raw": "raw norm"}
    for r in d["rows"]:
        lines.append(
            f"| {names.get(r['rule'], r['rule'])} | {r['limit']:g} "
            f"| {r['honest_dropped']}/{r['honest_replies']} "
            f"| {r['scaled_x10_caught']}/{r['scaled_x10_tried']} | {r['max_honest_ratio']:.2f} |"
        )
    return [*lines, ""]


@from_results("bn_refresh.json")
def bn_refresh(path: Path, d: dict) -> list[str]:
    lines = [
        f"**BatchNorm statistics re-estimated for the final weights** (`{path.name}`; "
        f"{d['machine']}): recorded federations (`fed_vs_central_seeds.json`, by label) and the "
        "same seeds' centralized models, held-out mAP50-95 before → after re-estimating every "
        f"BatchNorm layer's running statistics ({d['statistics']}; weights unchanged).",
        "",
        "| label | split | E × rounds | seed | federated | change | centralized | change "
        "| date, code |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in d["rows"]:
        f, c = r["federated"], r["centralized"]
        rounds = r["epoch_budget"] // r["local_epochs"]
        lines.append(
            f"| {r['label']} | {r['split']} | {r['local_epochs']} × {rounds} | {r['seed']} "
            f"| {f['before']:.3f} → {f['after']:.3f} | {f['change']:+.3f} "
            f"| {c['before']:.3f} → {c['after']:.3f} | {c['change']:+.3f} "
            f"| {r['date']}, {r.get('commit') or 'unrecorded'} |"
        )
    return [*lines, ""]


def _overrides(items: list[str]) -> str:
    """``key=value`` overrides, numbers to 3 significant digits; "none" when empty."""

    def short(item: str) -> str:
        key, _, value = item.partition("=")
        try:
            return f"{key}={float(value):.3g}" if "." in value else item
        except ValueError:
            return item

    return ", ".join(f"`{short(i)}`" for i in items) or "none (the defaults)"


@from_results("tuning.json")
def tuning(path: Path, d: dict) -> list[str]:
    studies = {s["pruner"]: s for s in d["studies"]}
    order = [studies[p] for p in ("median", "none") if p in studies]
    names = {"median": "median pruner", "none": "no pruning"}
    lines = [
        f"**Tuning** (`{path.name}`; {d['machine']}; {d['date']}; {d['setup']['trials']} trials, "
        f"sampler seed {d['setup']['sampler_seed']}, base `{' '.join(d['setup']['base'])}`):",
        "",
        "| | " + " | ".join(names[s["pruner"]] for s in order) + " |",
        "|---|" + "---:|" * len(order),
        "| trials complete / pruned | "
        + " | ".join(f"{s['states']['COMPLETE']} / {s['states']['PRUNED']}" for s in order)
        + " |",
        "| client training seconds | "
        + " | ".join(f"{s['client_seconds']:.0f}" for s in order)
        + " |",
        "| best held-out mAP50-95 | " + " | ".join(f"{s['best_value']:.3f}" for s in order) + " |",
        "| wall seconds | " + " | ".join(f"{s['wall_seconds']:.0f}" for s in order) + " |",
        "",
        "| re-run | overrides | final mAP50-95 by seed | mean ± sd |",
        "|---|---|---|---:|",
    ]
    for r in d["reruns"]:
        seeds = ", ".join(
            f"{v:.3f} ({s})" for s, v in zip(r["seeds"], r["final_map50_95"], strict=True)
        )
        lines.append(
            f"| {r['label']} | {_overrides(r['overrides'])} | {seeds} | "
            f"{r['mean']:.3f} ± {r['sd']:.3f} |"
        )
    return [*lines, ""]


def tuning_live() -> list[str]:
    """Live pruned studies against unpruned ones (``tuning.py``: ``tuning_live*.json``), one row
    per sampler seed."""
    paths = sorted(RESULTS.glob("tuning_live*.json"))
    if not paths:
        return []
    runs = [json.loads(p.read_text()) for p in paths]
    runs.sort(key=lambda d: d["setup"]["sampler_seed"])
    bases = {" ".join(d["setup"]["base"]) for d in runs}
    lines = [
        f"**Live pruned studies** (`{'`, `'.join(p.name for p in paths)}`; "
        f"{'; '.join(sorted({d['machine'] for d in runs}))}; "
        f"{', '.join(sorted({d['date'] for d in runs}))}; {runs[0]['setup']['trials']} trials "
        f"each; base `{' | '.join(sorted(bases))}`): fedyolo's default pruner against no pruning, "
        "the same sampler seed and trials. Where the unpruned study is one recorded in "
        "`pruning.json` (`--unpruned-from`), it ran earlier, on the code of its day:",
        "",
        "| sampler seed | unpruned study | pruned: complete / pruned / failed | client seconds, "
        "pruned / unpruned | saved | best mAP50-95, pruned / unpruned | best kept |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for d in runs:
        pruned, full = d["studies"]
        r = d["result"]
        st = pruned["states"]
        where = (
            f"`{full['study']}` (recorded; this base adds "
            f"`{' '.join(full['added_to_its_base']) or 'nothing'}`)"
            if "added_to_its_base" in full
            else f"`{full['study']}` (same run, same code"
            + (f": {d['commit']})" if d.get("commit") else ")")
        )
        lines.append(
            f"| {d['setup']['sampler_seed']} | {where} | {st['COMPLETE']} / {st['PRUNED']} / "
            f"{st['FAIL']} | {pruned['client_seconds']:.0f} / {full['client_seconds']:.0f} | "
            f"**{100 * r['pruning_client_seconds_saved']:.0f}%** | {pruned['best_value']:.3f} / "
            f"{full['best_value']:.3f} | {r['best_value_pruned_over_full']:.2f}x |"
        )
    return [*lines, ""]


@from_results("tuning_defaults.json")
def tuning_defaults(path: Path, d: dict) -> list[str]:
    base = next(r for r in d["reruns"] if r["label"] == d["defaults_label"])
    lines = [
        f"**Candidate defaults and tuned configurations** (`{path.name}`; {d['machine']}; "
        f"{d['date']}; base `{' '.join(d['setup']['base'])}`; every row 3 seeds; today's "
        f"defaults: **{base['label']}**):",
        "",
        "| re-run | overrides | final mAP50-95 by seed | mean ± sd | over the defaults |",
        "|---|---|---|---:|---:|",
    ]
    for r in d["reruns"]:
        seeds = ", ".join(
            f"{v:.3f} ({s})" for s, v in zip(r["seeds"], r["final_map50_95"], strict=True)
        )
        lines.append(
            f"| {r['label']} | {_overrides(r['overrides'])} | {seeds} | "
            f"{r['mean']:.3f} ± {r['sd']:.3f} | {r['mean'] / base['mean']:.2f}x |"
        )
    return [*lines, ""]


def _base(overrides: list[str]) -> str:
    return " ".join(o for o in overrides if not o.startswith("output."))


@from_results("pruning.json")
def pruning(path: Path, d: dict) -> list[str]:
    studies = d["studies"]
    lines = [
        f"**Pruners replayed on unpruned studies** (`{path.name}`; {d['machine']}; {d['date']}; "
        + "; ".join(
            f"({i + 1}) {s['study']}" + (f" ({s['date']})" if "date" in s else "") + ": "
            f"{s['trials']} trials x {s['rounds']} rounds, TPE seed "
            f"{s['sampler_seed']}, base `{_base(s['base'])}`: "
            f"{s['client_seconds']:.0f} "
            f"client s, best {s['best_value']:.3f}"
            for i, s in enumerate(studies)
        )
        + "). Each cell: trials pruned / client seconds saved (as run, overlapped; with rounds "
        "one after the other, what pruned studies now do) / best value kept over the unpruned "
        "study's; Hyperband puts trials in brackets by a hash of the study's name, so its cells "
        "also give the spread over 20 names. Today's default: successive halving on map+loss.",
        "",
        "| pruner | " + " | ".join(f"study ({i + 1})" for i in range(len(studies))) + " |",
        "|---|" + "---:|" * len(studies),
    ]
    for name in studies[0]["pruners"] if studies else []:
        cells = []
        for s in studies:
            r = s["pruners"].get(name)
            cells.append(
                "n/a"
                if r is None
                else f"{r['pruned']} / {r['client_seconds_saved']:.0%} "
                f"({r['client_seconds_saved_sequential']:.0%}) / {r['best_over_full']:.2f}x"
                + (
                    f"; {r['draws']} names: {r['saved_sequential_min']:.0%}-"
                    f"{r['saved_sequential_max']:.0%}, best kept in "
                    f"{r['draws_best_within_5pct']:.0%}"
                    if r["saved_sequential_max"] > r["saved_sequential_min"]
                    or r["best_over_full_min"] < r["best_over_full"]
                    else ""
                )
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


SECTIONS = {
    "tuning": tuning,
    "tuning_defaults": tuning_defaults,
    "tuning_live": tuning_live,
    "pruning": pruning,
    "edge": edge,
    "edge_avx2": edge_avx2,
    "edge_zen4": edge_zen4,
    "int8_profile_avx2": int8_profile_avx2,
    "int8_profile_zen4": int8_profile_zen4,
    "distill": distill,
    "fed_vs_central": fed_vs_central,
    "fed_vs_central_seeds": fed_vs_central_seeds,
    "bn_refresh": bn_refresh,
    "strategies_noniid": strategies_noniid,
    "transport": transport,
    "faults": faults,
    "norm_replay": norm_replay,
    "guard_replay": guard_replay,
    "round_overhead": round_overhead,
    "cold_start": cold_start,
    "cold_start_avx2": cold_start_avx2,
    "cold_start_zen4": cold_start_zen4,
    "scale": scale,
}


def render(names: list[str] | None = None) -> str:
    """The named sections (all by default) as Markdown."""
    return "\n".join(line for name in (names or SECTIONS) for line in SECTIONS[name]())


if __name__ == "__main__":
    import sys

    print(render(sys.argv[1:] or None))
