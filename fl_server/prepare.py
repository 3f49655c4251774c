"""Prepare a run directory before any round: data, checks, shards, config and manifest."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig

from fl_server import config as config_mod
from fl_server.data import (
    CLASSES,
    DataError,
    Partition,
    check_dataset,
    generate,
    load_dataset,
    partition,
    write_partition,
)
from fl_server.run_dir import RunDir, write_json

LOGGER = logging.getLogger("fedyolo")

PACKAGES = (
    "fedyolo",
    "flwr",
    "ultralytics",
    "torch",
    "torchvision",
    "ray",
    "hydra-core",
    "numpy",
    "opencv-python",
    "clearml",
    "optuna",
    "onnxruntime",
)


def synth_dataset(cfg: DictConfig) -> Path:
    """The synthetic fleet for ``cfg.data.synth``, generated once into the cache and reused."""
    s = cfg.data.synth
    key = json.dumps(
        {
            "n": int(s.images),
            "imgsz": int(s.imgsz),
            "domains": list(s.domains),
            "seed": int(cfg.seed),
            "classes": list(CLASSES),
            "v": 1,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = Path(str(cfg.data.cache_dir)).expanduser().resolve() / f"synth-{digest}"
    data_yaml = out / "data.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    # one process generates, the others (parallel tuning workers, runs) wait and reuse it
    with (out.parent / f"synth-{digest}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / ".complete").exists():
            return data_yaml
        t0 = time.perf_counter()
        generate(
            out, int(s.images), imgsz=int(s.imgsz), seed=int(cfg.seed), domains=list(s.domains)
        )
        (out / ".complete").write_text("ok\n")
    LOGGER.info(
        "generated %d synthetic images in %.1f s → %s", int(s.images), time.perf_counter() - t0, out
    )
    return data_yaml


def run_name(cfg: DictConfig) -> str:
    if cfg.name:
        return str(cfg.name)
    model = Path(str(cfg.model.cfg)).stem
    return (
        f"{model}-{cfg.data.partition}-{cfg.federation.clients}c-{time.strftime('%Y%m%d-%H%M%S')}"
    )


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            found[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            found[p] = None
    return found


def prepare_run(cfg: DictConfig) -> RunDir:
    """Create ``runs/<name>``: check and partition the data, write config and manifest.

    With ``output.overwrite=true`` an existing run is replaced, and only a fedyolo run (a folder
    with fedyolo's ``manifest.json``): anything else there is refused, never deleted. It is
    replaced only once the new data has loaded, checked and partitioned: it is moved aside,
    the new run is written, and the old one is deleted last (put back if writing the new one
    fails). A failure before that leaves the old run as it was.
    """
    run = RunDir(Path(str(cfg.output.dir)).expanduser().resolve() / run_name(cfg))
    replacing = run.path.exists() and any(run.path.iterdir())
    if replacing and not cfg.output.overwrite:
        raise config_mod.ConfigError(
            f"run directory {run.path} already exists; choose another name= or set "
            "output.overwrite=true"
        )
    if replacing and not is_fedyolo_run(run.path):
        raise config_mod.ConfigError(
            f"output.overwrite=true: {run.path} is not a fedyolo run (no fedyolo manifest.json); "
            "refusing to delete it: choose another name= or output.dir="
        )
    # never a run under way (one started by fedyolo has the lock file)
    with run.held(create=False) if replacing else contextlib.nullcontext():
        _prepare(cfg, run, replacing)
    return run


def _prepare(cfg: DictConfig, run: RunDir, replacing: bool) -> None:
    staging = run.path.with_name(f".{run.path.name}.preparing")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        source, ds, report, part = _checked_data(cfg, staging / RunDir.REPAIRED)
        _check_teacher(cfg, list(ds.names))
        aside = run.path.with_name(f".{run.path.name}.replaced") if replacing else None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(run.path, aside)
        try:
            _write_run(cfg, run, source, ds, report, part, staging / RunDir.REPAIRED)
        except BaseException:
            if aside is not None:
                shutil.rmtree(run.path, ignore_errors=True)
                os.replace(aside, run.path)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_fedyolo_run(path: Path) -> bool:
    """Whether ``path`` holds a run fedyolo prepared: its ``manifest.json``, as written below."""
    try:
        manifest = json.loads(RunDir(path).manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"run", "created", "packages", "data"} <= set(manifest)


# data.partition=none: the clients bring their own data (node config data-path, as a fleet's
# instances do); data.path is the server's held-out set, all of it, and the run directory holds
# only data/server_val (docs/how-to/fleet-data.md).
HELD_OUT_ONLY = "none"

TEACHER = RunDir.TEACHER  # a distillation run's copy of its teacher (fl_client.distill)


def _check_teacher(cfg: DictConfig, names: list[str]) -> None:
    """A distillation teacher that cannot teach this federation stops here, in one line."""
    if cfg.distill.teacher is None:
        return
    from fl_client.distill import load_teacher
    from fl_client.model import ModelConfigError, build_model

    try:
        load_teacher(str(cfg.distill.teacher), names, build_model(str(cfg.model.cfg), names))
    except ModelConfigError as e:
        raise config_mod.ConfigError(f"config: {e}") from e


def _checked_data(cfg: DictConfig, repaired: Path):
    """The dataset loaded, checked (repaired label copies in ``repaired``) and partitioned."""
    held_out_only = str(cfg.data.partition) == HELD_OUT_ONLY
    if held_out_only and not cfg.data.path:
        raise config_mod.ConfigError(
            "config: data.partition=none (the clients bring their own data) needs data.path: "
            "the server's held-out set, e.g. the server_val/ folder of `fedyolo data partition`"
        )
    source = Path(str(cfg.data.path)).expanduser() if cfg.data.path else synth_dataset(cfg)
    ds = load_dataset(source, cache_dir=Path(str(cfg.data.cache_dir)).expanduser())
    report = check_dataset(ds, work_dir=repaired, repair=True)
    if held_out_only:  # every usable image is the server's; no client shard is written
        if not report.usable:
            raise DataError(f"data.path={source}: no usable image for the held-out set")
        part = Partition(
            server_val=list(report.usable),
            clients=[],
            method=HELD_OUT_ONLY,
            alpha=0.0,
            seed=int(cfg.seed),
        )
        return source, ds, report, part
    part = partition(
        report.usable,
        int(cfg.federation.clients),
        method=str(cfg.data.partition),
        alpha=float(cfg.data.alpha),
        seed=int(cfg.seed),
        server_val_fraction=float(cfg.data.server_val_fraction),
        client_val_fraction=float(cfg.data.client_val_fraction),
    )
    return source, ds, report, part


def _write_run(cfg, run: RunDir, source: Path, ds, report, part, repaired: Path) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    report.write(run.data_check)
    if report.issues:
        LOGGER.warning(
            "data check: %d issue(s), see %s\n%s",
            sum(report.counts.values()),
            run.data_check,
            report.summary(),
        )
    part_manifest_path = write_partition(part, list(ds.names), run.data)
    part_manifest = json.loads(Path(part_manifest_path).read_text())
    if repaired.is_dir():  # the cleaned label copies stay with the run, for the user to see
        os.replace(repaired, run.repaired_labels)

    run.config.write_text(config_mod.to_yaml(cfg))
    teacher = None
    if cfg.distill.teacher is not None:  # the run keeps the teacher it learnt from
        shutil.copy2(Path(str(cfg.distill.teacher)).expanduser(), run.path / TEACHER)
        teacher = {
            "source": str(Path(str(cfg.distill.teacher)).expanduser().resolve()),
            "file": TEACHER,
            "sha256": hashlib.sha256((run.path / TEACHER).read_bytes()).hexdigest(),
        }
    write_json(
        run.manifest,
        {
            "run": run.path.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seed": int(cfg.seed),
            "git_sha": _git_sha(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": _versions(),
            "distill_teacher": teacher,
            "data": {
                "source": str(source),
                "names": list(ds.names),
                "data_version": part_manifest["data_version"],
                "partition": str(cfg.data.partition),
                # true: the clients bring their own data; no client shard was written
                "clients_own_data": str(cfg.data.partition) == HELD_OUT_ONLY,
                "server_val_images": part_manifest["server_val"]["images"],
                "clients": [
                    {
                        "id": c["id"],
                        "train_images": c["train_images"],
                        "val_images": c["val_images"],
                    }
                    for c in part_manifest["clients"]
                ],
                "check_issues": sum(report.counts.values()),
            },
        },
    )


__all__ = ["DataError", "prepare_run", "synth_dataset"]
