"""Flower's simulation engine (Ray): the default engine of ``fedyolo run``."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from fl_server.run_dir import RunDir

LOGGER = logging.getLogger("fedyolo")


def run_simulation(run: RunDir, cfg: DictConfig) -> None:
    """Run the prepared federation in Flower's simulation engine, one Ray actor per client."""
    import torch
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fl_client.client_app import app as client_app
    from fl_server.server_app import server_app_for

    gpus = float(cfg.engine.client_gpus) if torch.cuda.is_available() else 0.0
    backend_config = {
        "client_resources": {"num_cpus": int(cfg.engine.client_cpus), "num_gpus": gpus},
        "init_args": {"log_to_driver": False, "include_dashboard": False},
    }
    flwr_run_simulation(
        server_app=server_app_for(run.path),
        client_app=client_app,
        num_supernodes=int(cfg.federation.clients),
        backend_config=backend_config,
    )
