"""The settings of ``fedyolo export`` and ``fedyolo bench``: ``configs/edge/<command>.yaml`` plus
``key=value`` overrides, checked so a wrong value stops with one line naming the key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from deploy import settings
from deploy.edge import EdgeError
from fl_server.config import CONFIG_DIR


def load(command: str, overrides: Sequence[str] = ()) -> DictConfig:
    cfg = settings.load(CONFIG_DIR / "edge" / f"{command}.yaml", overrides, command, EdgeError)
    (_check_export if command == "export" else _check_bench)(cfg)
    return cfg


def _ints(value, key: str, minimum: int = 1) -> list[int]:
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and v >= minimum for v in values):
        raise EdgeError(f"{key}: expected integers >= {minimum}, got {value}")
    return values


def _check_export(cfg: DictConfig) -> None:
    if cfg.format not in ("onnx", "engine", "openvino"):
        raise EdgeError(f"format: {cfg.format!r} is not onnx, engine or openvino")
    if cfg.quantize not in (32, 16, 8):
        raise EdgeError(f"quantize: {cfg.quantize!r} is not 32, 16 or 8")
    if cfg.imgsz is not None:
        (size,) = _ints(cfg.imgsz, "imgsz", 32)
        if size % 32:
            raise EdgeError(f"imgsz: {size} is not a multiple of the stride 32")
    if cfg.int8.activations not in ("auto", "u8", "s8"):
        raise EdgeError(f"int8.activations: {cfg.int8.activations!r} is not auto, u8 or s8")
    if cfg.int8.ops not in ("auto", "weighted", "all"):
        raise EdgeError(f"int8.ops: {cfg.int8.ops!r} is not auto, weighted or all")
    cal = str(cfg.int8.calibration)
    if cal not in ("federated", "pooled") and not Path(cal).expanduser().is_dir():
        raise EdgeError(f"int8.calibration: {cal!r} is not federated, pooled or a folder")
    _ints(cfg.int8.images, "int8.images")
    _ints(cfg.gates.samples, "gates.samples")
    for key in ("parity_max_abs", "map_tolerance", "int8_max_drop", "conf", "iou"):
        value = cfg.gates[key] if key in cfg.gates else cfg[key]
        if not isinstance(value, int | float) or value < 0:
            raise EdgeError(f"{key}: expected a number >= 0, got {value!r}")


def _check_bench(cfg: DictConfig) -> None:
    if cfg.imgsz is not None:
        cfg.imgsz = _ints(cfg.imgsz, "imgsz", 32)
    cfg.threads = _ints(cfg.threads, "threads")
    runtimes = list(cfg.runtimes) if OmegaConf.is_list(cfg.runtimes) else [cfg.runtimes]
    unknown = [r for r in runtimes if r not in ("onnxruntime", "openvino")]
    if not runtimes or unknown:
        raise EdgeError(f"runtimes: {unknown or runtimes} not onnxruntime or openvino")
    cfg.runtimes = runtimes
    _ints(cfg.runs, "runs")
    _ints(cfg.warmup, "warmup", 0)
