"""``FedYolo``: what every strategy of a fedyolo run gets, whichever strategy it is.

It wraps the configured strategy (Flower's, a DP wrapper, or a user's) and adds, in
``aggregate_train``:

* **a minimum of good replies** (``aggregation.min_replies``): below it the round fails, the
  reason goes to ``events.jsonl`` and the global model stays as it was. Replies the server's grid
  already dropped (NaN, wrong shape, insane norm; see ``fl_server.observed_grid``) do not count.
  An error inside the strategy's own aggregation (e.g. Krum with too few replies left) fails the
  round the same way instead of ending the run.
* **example weights that cannot be gamed**: a client's claimed ``num-examples`` is capped at
  ``aggregation.max_examples`` and, with 3 or more replies, at ``aggregation.clip_x_median`` ×
  the round's median claim. Each cap is recorded (``weight_capped`` event).
* **BatchNorm statistics done right** (``bn_stats_mask``): for strategies that transform the
  mean update (server optimizers, DP noise), BatchNorm running means and variances are replaced
  by their example-weighted mean over the replies. An optimizer step or Gaussian noise applied to
  a running variance can drive it negative (a NaN model); statistics are estimates to average,
  not parameters to optimize. ``num_batches_tracked`` is never exchanged at all
  (``fl_client.model``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_client.model import WEIGHTS_KEY
from fl_client.wire import NUM_EXAMPLES

LOGGER = logging.getLogger(__name__)

WEIGHT_KEY = NUM_EXAMPLES  # Flower strategies weight replies by this metric


class FedYolo(Strategy):
    """Delegates to ``inner``; guards its aggregation (see module docstring)."""

    def __init__(
        self,
        inner: Strategy,
        *,
        min_replies: int = 1,
        max_examples: int | None = None,
        clip_x_median: float | None = None,
        bn_stats_mask: np.ndarray | None = None,
        run_dir: Any = None,
    ):
        self.inner = inner
        self.min_replies = max(1, int(min_replies))
        self.max_examples = None if max_examples is None else int(max_examples)
        self.clip_x_median = None if clip_x_median is None else float(clip_x_median)
        self.bn_stats_mask = bn_stats_mask
        self.run_dir = run_dir

    def __getattr__(self, name: str) -> Any:  # the inner strategy's own attributes and state
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- delegated ---------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        LOGGER.info(
            "FedYolo guard around %s: min_replies=%d max_examples=%s clip_x_median=%s bn_stats=%s",
            type(self.inner).__name__,
            self.min_replies,
            self.max_examples,
            self.clip_x_median,
            "average" if self.bn_stats_mask is not None else "strategy",
        )
        self.inner.summary()

    # -- guarded aggregation -----------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        good = [r for r in replies if not r.has_error()]
        if len(good) < self.min_replies:
            return self._round_failed(
                server_round,
                f"{len(good)} good replies, fewer than aggregation.min_replies="
                f"{self.min_replies}; the global model is unchanged",
            )
        self._cap_weights(server_round, good)
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, replies)
        except Exception as e:  # a strategy's own check (e.g. Krum's client count)
            LOGGER.exception("round %d: the strategy's aggregation failed", server_round)
            return self._round_failed(
                server_round,
                f"the strategy's aggregation raised {type(e).__name__}: {e}; "
                "the global model is unchanged",
            )
        if arrays is not None and self.bn_stats_mask is not None:
            self._average_bn_stats(arrays, good)
        return arrays, metrics

    def _event(self, server_round: int, kind: str, **fields: Any) -> None:
        if self.run_dir is not None:
            self.run_dir.event(server_round, kind, **fields)

    def _round_failed(self, server_round: int, reason: str) -> tuple[None, None]:
        LOGGER.warning("round %d failed: %s", server_round, reason)
        self._event(server_round, "round_failed", reason=reason)
        return None, None

    def _cap_weights(self, server_round: int, replies: list[Message]) -> None:
        """Cap each reply's ``num-examples`` in place (the claim is kept in the event)."""
        claims = [_claim(r) for r in replies]
        if any(c is None for c in claims):
            return  # the strategy will report the missing key itself
        cap = float("inf")
        if self.max_examples is not None:
            cap = float(self.max_examples)
        if self.clip_x_median is not None and len(claims) >= 3:
            cap = min(cap, self.clip_x_median * float(np.median(claims)))
        for reply, claim in zip(replies, claims, strict=True):
            if claim > cap:
                used = max(1, int(cap))
                metrics = _metrics(reply)
                metrics[WEIGHT_KEY] = used
                pid = metrics.get("partition-id", f"node-{reply.metadata.src_node_id}")
                self._event(
                    server_round,
                    "weight_capped",
                    client=pid,
                    claimed=int(claim),
                    used=used,
                    reason=(
                        f"num-examples {int(claim)} above the cap {used} "
                        f"(aggregation.max_examples={self.max_examples}, "
                        f"aggregation.clip_x_median={self.clip_x_median})"
                    ),
                )

    def _average_bn_stats(self, arrays: ArrayRecord, replies: list[Message]) -> None:
        """Set the aggregate's BatchNorm statistics to the replies' example-weighted mean.

        Changes ``arrays`` in place, so a strategy that keeps the same record as its state
        (FedAvgM's ``current_arrays``) stays in step.
        """
        mask = self.bn_stats_mask
        vecs, weights = [], []
        for r in replies:
            rec = next(iter(r.content.array_records.values()))
            if WEIGHTS_KEY not in rec:
                return
            vecs.append(rec[WEIGHTS_KEY].numpy().reshape(-1)[mask])
            weights.append(float(_claim(r) or 1))
        if WEIGHTS_KEY not in arrays or not vecs:
            return
        flat = arrays[WEIGHTS_KEY].numpy().reshape(-1).copy()
        if flat.size != mask.size:
            return
        w = np.asarray(weights) / np.sum(weights)
        flat[mask] = np.tensordot(w, np.stack(vecs), axes=1).astype(np.float32)
        arrays[WEIGHTS_KEY] = Array(flat)


def _metrics(reply: Message) -> MetricRecord:
    return next(iter(reply.content.metric_records.values()), MetricRecord())


def _claim(reply: Message) -> float | None:
    value = _metrics(reply).get(WEIGHT_KEY)
    return None if value is None else float(value)
