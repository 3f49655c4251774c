"""A user's own strategy, plugged in by import path: the README's example, plus a call log."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg


class DampedFedAvg(FedAvg):
    """FedAvg that moves the global model only `damping` of the way to the clients' mean."""

    calls: list[tuple[int, float]] = []  # (round, damping) of each aggregation, for the test

    def __init__(self, damping: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.damping = damping

    def configure_train(self, server_round, arrays, config, grid):
        self.previous = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            d = self.damping
            for k in arrays:  # ArrayRecord: fedyolo sends one packed float32 vector, "weights"
                mixed = d * arrays[k].numpy() + (1 - d) * self.previous[k].numpy()
                arrays[k] = type(arrays[k])(mixed)
        DampedFedAvg.calls.append((server_round, self.damping))
        return arrays, metrics
