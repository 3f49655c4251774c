"""What happens to a bad update, in one place: the checks every strategy gets.

A client's reply passes three stages, each owning one kind of harm; all their limits come
from the config group ``aggregation`` (read once, into :class:`AggregationPolicy`) and from
``guard``:

1. **Decoding and per-reply checks** (:mod:`strategies.reply_rules`, and the reply's contract
   in ``fl_client.wire``; the grid, ``fl_server.observed_grid``, calls them for every reply of
   a round and records what they refuse): the reply's transport is
   decoded against the model that client was sent; wrong keys, dtypes or sizes, non-finite
   values, malformed metrics and an update norm above ``max_update_ratio`` × the global model's,
   a norm per local step above ``max_step_norm_x_median`` × the round's median (or a raw norm
   above ``max_norm_x_median`` × the median) drop the reply (``update_rejected`` /
   ``client_failed`` event). A dropped reply never reaches a strategy.
2. **Aggregation** (:class:`GuardedStrategy`, this module), around the configured strategy
   (Flower's, a DP wrapper, or a user's):

   * *a minimum of good replies* (``min_replies``): below it the round fails, the reason goes
     to ``events.jsonl`` and the global model stays as it was. An error inside the strategy's
     own aggregation (e.g. Krum with too few replies left) fails the round the same way
     instead of ending the run.
   * *example weights that cannot be gamed*: a client's claimed ``num-examples`` is capped at
     ``max_examples`` and, with 3 or more replies, at ``clip_x_median`` × the round's median
     claim. Each cap is recorded (``weight_capped`` event).
   * *BatchNorm statistics done right* (``bn_stats_mask``): for strategies that transform the
     mean update (server optimizers, DP noise), BatchNorm running means and variances are
     replaced by their example-weighted mean over the replies. An optimizer step or Gaussian
     noise applied to a running variance can drive it negative (a NaN model); statistics are
     estimates to average, not parameters to optimize. ``num_batches_tracked`` is never
     exchanged at all (``fl_client.model``). ``bn_stats=pooled`` (any strategy) also averages
     the means, and sets each running variance to the variance of the union of the clients'
     data, ``Σ w·var + Σ w·(mean − mean̄)²``: the plain mean of the variances leaves out how far
     the clients' means lie apart, so under domain shift the averaged model would normalize the
     mixture of domains with too small a variance.
3. **The held-out guard** (``fl_server.guard``): the aggregate is evaluated on the server's
   held-out set; a drop of more than ``guard.max_drop`` rolls the round back and names the
   clients whose removal restores the model (leave-one-out attribution).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_client.model import bn_spread
from fl_client.wire import NUM_EXAMPLES, PARTITION_ID, WEIGHTS_KEY
from fl_server.records import EventKind

LOGGER = logging.getLogger(__name__)

WEIGHT_KEY = NUM_EXAMPLES  # Flower strategies weight replies by this metric


@dataclass(frozen=True)
class AggregationPolicy:
    """The config group ``aggregation``, read once; stages 1 and 2 take their limits from it.

    Its defaults live in ``configs/config.yaml`` and its validation in ``fl_server.config``.
    """

    min_replies: int = 1
    max_examples: int | None = None
    clip_x_median: float | None = None
    max_update_ratio: float | None = None
    max_norm_x_median: float | None = None
    max_step_norm_x_median: float | None = None

    @classmethod
    def from_cfg(cls, cfg: Any) -> AggregationPolicy:
        """From a run config (its ``aggregation`` group)."""
        agg = cfg.aggregation

        def opt(value: Any, kind: type) -> Any:
            return None if value is None else kind(value)

        return cls(
            min_replies=max(1, int(agg.min_replies)),
            max_examples=opt(agg.max_examples, int),
            clip_x_median=opt(agg.clip_x_median, float),
            max_update_ratio=opt(agg.max_update_ratio, float),
            max_norm_x_median=opt(agg.max_norm_x_median, float),
            max_step_norm_x_median=opt(agg.get("max_step_norm_x_median"), float),
        )


class GuardedStrategy(Strategy):
    """Delegates to ``inner``; guards its aggregation (stage 2 of the module docstring)."""

    def __init__(
        self,
        inner: Strategy,
        policy: AggregationPolicy | None = None,
        *,
        bn_stats_mask: np.ndarray | None = None,
        bn_pooled: tuple[np.ndarray, np.ndarray] | None = None,
        run_dir: Any = None,
    ):
        self.inner = inner
        self.policy = policy or AggregationPolicy()
        self.bn_stats_mask = bn_stats_mask
        self.bn_pooled = bn_pooled
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
            "GuardedStrategy around %s: %s bn_stats=%s",
            type(self.inner).__name__,
            self.policy,
            "strategy"
            if self.bn_stats_mask is None
            else ("pooled" if self.bn_pooled is not None else "average"),
        )
        self.inner.summary()

    # -- guarded aggregation -----------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        good = [r for r in replies if not r.has_error()]
        if len(good) < self.policy.min_replies:
            return self._round_failed(
                server_round,
                f"{len(good)} good replies, fewer than aggregation.min_replies="
                f"{self.policy.min_replies}; the global model is unchanged",
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

    def _event(self, server_round: int, kind: EventKind, **fields: Any) -> None:
        if self.run_dir is not None:
            self.run_dir.event(server_round, kind, **fields)

    def _round_failed(self, server_round: int, reason: str) -> tuple[None, None]:
        LOGGER.warning("round %d failed: %s", server_round, reason)
        self._event(server_round, EventKind.ROUND_FAILED, reason=reason)
        return None, None

    def _cap_weights(self, server_round: int, replies: list[Message]) -> None:
        """Cap each reply's ``num-examples`` in place (the claim is kept in the event)."""
        claims = [_claim(r) for r in replies]
        if any(c is None for c in claims):
            return  # the strategy will report the missing key itself
        p = self.policy
        cap = float("inf")
        if p.max_examples is not None:
            cap = float(p.max_examples)
        if p.clip_x_median is not None and len(claims) >= 3:
            cap = min(cap, p.clip_x_median * float(np.median(claims)))
        for reply, claim in zip(replies, claims, strict=True):
            if claim > cap:
                used = max(1, int(cap))
                metrics = _metrics(reply)
                metrics[WEIGHT_KEY] = used
                pid = metrics.get(PARTITION_ID, f"node-{reply.metadata.src_node_id}")
                self._event(
                    server_round,
                    EventKind.WEIGHT_CAPPED,
                    client=pid,
                    claimed=int(claim),
                    used=used,
                    reason=(
                        f"num-examples {int(claim)} above the cap {used} "
                        f"(aggregation.max_examples={p.max_examples}, "
                        f"aggregation.clip_x_median={p.clip_x_median})"
                    ),
                )

    def _average_bn_stats(self, arrays: ArrayRecord, replies: list[Message]) -> None:
        """Set the aggregate's BatchNorm statistics to the replies' example-weighted mean (the
        variances pooled over the clients with ``bn_pooled``).

        Changes ``arrays`` in place, so a strategy that keeps the same record as its state
        (FedAvgM's ``current_arrays``) stays in step.
        """
        mask = self.bn_stats_mask
        vecs, weights = [], []
        for r in replies:
            rec = next(iter(r.content.array_records.values()))
            if WEIGHTS_KEY not in rec:
                return
            vecs.append(rec[WEIGHTS_KEY].numpy().reshape(-1))
            weights.append(float(_claim(r) or 1))
        if WEIGHTS_KEY not in arrays or not vecs:
            return
        flat = arrays[WEIGHTS_KEY].numpy().reshape(-1).copy()
        if flat.size != mask.size or any(v.size != mask.size for v in vecs):
            return
        w = np.asarray(weights, np.float64) / np.sum(weights)
        flat[mask] = np.tensordot(w, np.stack([v[mask] for v in vecs]), axes=1).astype(np.float32)
        if self.bn_pooled is not None:
            means, variances = self.bn_pooled
            m = np.stack([v[means] for v in vecs]).astype(np.float64)
            flat[variances] += bn_spread(m, w).astype(np.float32)  # mean of variances + spread
        arrays[WEIGHTS_KEY] = Array(flat)


def _metrics(reply: Message) -> MetricRecord:
    return next(iter(reply.content.metric_records.values()), MetricRecord())


def _claim(reply: Message) -> float | None:
    value = _metrics(reply).get(WEIGHT_KEY)
    return None if value is None else float(value)
