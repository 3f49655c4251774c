"""A user's strategy that holds something pickle cannot save (a lambda)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg


class LambdaFedAvg(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.transform = lambda arrays: arrays
