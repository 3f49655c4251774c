"""A fedyolo process's variables for Ultralytics, Flower and Ray, in a module that imports
nothing else.

Its own module so that the CLI (``fl_server.cli``) sets them before any command runs without
importing ``fl_server.api`` and what that pulls in (the run preparation, OpenCV, NumPy):
``fedyolo --help`` stays fast. Nothing is set at import: a caller sets them when it starts work.
"""

from __future__ import annotations

import os


def set_process_environment() -> None:
    """What a fedyolo process sets before its work (the CLI's ``main``, ``run``, ``distill``),
    each only where the user has not: importing fedyolo changes nothing.

    Nothing is downloaded at run time (``YOLO_OFFLINE``: Ultralytics reads it when it is first
    imported). Flower's telemetry is off unless the user turns it on: robots' fleets don't phone
    home, and offline every Flower process otherwise waits on the telemetry call at start and
    exit. Ray keeps ``CUDA_VISIBLE_DEVICES`` of actors given no GPU.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
