"""The mAP drift guard: after every round, keep the new global model or roll it back.

The global model's monitored metric (``guard.metric``, on the server's held-out set) is compared
with a reference: the best accepted round so far (``guard.reference=best``) or the last accepted
one (``previous``). A relative drop above ``guard.max_drop`` (default 10 %) that is also at least
``guard.min_abs_drop`` in absolute terms, and *significant* on the held-out images, rolls the
global model back to the best checkpoint, server-side strategy state included
(``fl_server.guard.step``). Significant: a paired bootstrap over the held-out images
(``paired_drop``: both models' per-image matches are computed once by the evaluation; each of
``guard.bootstrap`` resamples recomputes both mAPs on the same resampled images) puts the
one-sided ``guard.significance`` lower bound of the drop above 0, so a dip within the held-out
set's own noise is not a rollback. It is computed only when the rule above fires.

Then training noise: honest FedAvg rounds dip by more than 10 %, significantly on the held-out
images, and recover the next round (benchmarks/guard_replay.py). So a significant drop of less
than ``guard.severe_drop`` (relative, default 50 %) is put *on probation* for ``guard.patience``
rounds: it is accepted as the global model that training continues from, but it never becomes
the reference nor ``best.pt``, and the round's metrics say so; if the next round is still a
significant drop below the reference, that round rolls back; so does a drop in the run's last
round (nothing is left to confirm it: a run never ends on a model on probation). A drop of
``severe_drop`` or more (every weight fault in benchmarks/faults.py collapsed the mAP to ~0), or
a metric that is not finite, rolls back at once (``severe_drop=null``: only the latter).
``guard.patience=0``: every drop rolls back at once. Then the policy:

* ``rollback``: only roll back;
* ``lower_lr``: roll back and multiply the clients' ``lr0`` by ``guard.lr_factor`` from now on;
* ``exclude``: roll back and leave out, for ``guard.exclude_rounds`` rounds, the clients whose
  updates caused the drop, found by leave-one-out (``attribute``): the round's aggregate without
  client k is scored on the held-out set, and k is a culprit when removing it restores the drop;

and, whatever the policy, the run stops after ``guard.stop_after`` consecutive rollbacks.
A rejected model is never promoted to ``best.pt``.

The package, by job (every name below is importable from ``fl_server.guard``):

* ``rule``: ``Guard`` (the rule, its state and the contribution rule), ``Decision``,
  ``GuardState``;
* ``matches``: per-image matches on disk (``save_images``, ``load_images``) and mAP recomputed
  from them (``metric_of``);
* ``stats``: the paired bootstraps (``paired_drop``, ``joint_gains``);
* ``attribution``: the leave-one-out culprit search (``attribute``, ``Attribution``);
* ``contributions``: ``update_agreement`` and ``replay_contributions``;
* ``step``: ``GuardStep``, what the round loop (``fl_server.federation``) calls once a round:
  rollback, probation, contributions, attribution and their events. It builds model records
  (torch): import it from ``fl_server.guard.step``; the rest stays light for ``benchmarks/``.
"""

from fl_server.guard.attribution import Attribution, attribute
from fl_server.guard.contributions import _scored, replay_contributions, update_agreement
from fl_server.guard.matches import _map, load_images, metric_of, save_images
from fl_server.guard.rule import Decision, Guard, GuardState
from fl_server.guard.stats import _interval, joint_gains, paired_drop

__all__ = [
    "Attribution",
    "Decision",
    "Guard",
    "GuardState",
    "_interval",
    "_map",
    "_scored",
    "attribute",
    "joint_gains",
    "load_images",
    "metric_of",
    "paired_drop",
    "replay_contributions",
    "save_images",
    "update_agreement",
]
