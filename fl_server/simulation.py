"""Flower's simulation engine (Ray): the default engine of ``fedyolo run``."""

from __future__ import annotations

import logging
import os
import threading

import torch
from flwr.simulation import run_simulation as flwr_run_simulation
from omegaconf import DictConfig

from fl_client import faults
from fl_client.client_app import app, app_with_fault_injection
from fl_server.interrupts import interrupts_to
from fl_server.run_dir import RunDir
from fl_server.server_app import server_app_for

LOGGER = logging.getLogger("fedyolo")


def run_simulation(run: RunDir, cfg: DictConfig) -> None:
    """Run the prepared federation in Flower's simulation engine, one Ray actor per client."""
    # the simulated nodes are this run's own: they act out the faults its config injects
    injecting = bool(faults.parse(cfg.faults, int(cfg.federation.clients)))
    client_app = app_with_fault_injection() if injecting else app

    stop = threading.Event()
    gpus = float(cfg.engine.client_gpus) if torch.cuda.is_available() else 0.0
    backend_config = {
        "client_resources": {"num_cpus": int(cfg.engine.client_cpus), "num_gpus": gpus},
        "init_args": {"log_to_driver": False, "include_dashboard": False},
    }
    # Flower's Ray backend exports this interpreter's sys.path as PYTHONPATH into os.environ
    # and leaves it there: every process started later from this one (a `fedyolo tune` worker,
    # Compose v1) would import from whatever sys.path held, e.g. a test folder named fl_client.
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        with interrupts_to(stop):  # Ctrl-C ends the round loop within a second
            flwr_run_simulation(
                server_app=server_app_for(run.path, stop),
                client_app=client_app,
                num_supernodes=int(cfg.federation.clients),
                backend_config=backend_config,
            )
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    if stop.is_set():
        raise KeyboardInterrupt  # the run is recorded `interrupted`; the caller decides the rest
