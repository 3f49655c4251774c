"""Flower's simulation engine (Ray): the default engine of ``fedyolo run``."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from omegaconf import DictConfig

from fl_server.run_dir import RunDir

LOGGER = logging.getLogger("fedyolo")


def run_simulation(run: RunDir, cfg: DictConfig) -> None:
    """Run the prepared federation in Flower's simulation engine, one Ray actor per client."""
    import torch
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fl_client.client_app import app as client_app
    from fl_server.server_app import server_app_for

    stop = threading.Event()
    gpus = float(cfg.engine.client_gpus) if torch.cuda.is_available() else 0.0
    backend_config = {
        "client_resources": {"num_cpus": int(cfg.engine.client_cpus), "num_gpus": gpus},
        "init_args": {"log_to_driver": False, "include_dashboard": False},
    }
    with _interrupts_to(stop):
        flwr_run_simulation(
            server_app=server_app_for(run.path, stop),
            client_app=client_app,
            num_supernodes=int(cfg.federation.clients),
            backend_config=backend_config,
        )
    if stop.is_set():
        raise KeyboardInterrupt  # the run is recorded `interrupted`; the caller decides the rest


@contextlib.contextmanager
def _interrupts_to(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C/SIGTERM set ``stop`` (the server ends the round loop within a second) instead of
    raising in the middle of Flower's engine, which would leave the ServerApp thread waiting
    out the round timeout; a second Ctrl-C leaves at once. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        LOGGER.warning("%s: stopping the run (Ctrl-C again to leave now)", signal.strsignal(signum))
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
