"""A user's own strategy, plugged in by import path (the README's example)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg


class DampedFedAvg(FedAvg):
    """FedAvg that moves the global model only ``damping`` of the way to the clients' mean."""

    calls: list[int] = []  # rounds aggregated (for the test)

    def __init__(self, damping: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.damping = damping

    def configure_train(self, server_round, arrays, config, grid):
        self._previous = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            from flwr.app import Array, ArrayRecord

            d = self.damping
            arrays = ArrayRecord(
                {
                    k: Array(d * arrays[k].numpy() + (1 - d) * self._previous[k].numpy())
                    for k in arrays
                }
            )
        DampedFedAvg.calls.append(server_round)
        return arrays, metrics
