"""Helpers shared by the test tiers (``tests/`` is on sys.path through its conftest)."""

from __future__ import annotations

from flwr.serverapp import Grid

# The tiny federation every tier runs: a 0.125-width YOLOv8 on 64 px synthetic images.
TINY_BASE = [
    "model=tiny",
    "data.synth.imgsz=64",
    "data.synth.domains=[day,night]",
    "train.imgsz=64",
    "train.batch=8",
    "train.epochs=1",  # the tiny fleet's own budget, whatever configs/train/default.yaml says
    "train.lr0=0.02",
    "train.eval_batch=16",
    "output.overwrite=true",
]


class StubGrid(Grid):
    """A Grid whose nodes are ``node_ids``; subclasses answer ``send_and_receive``."""

    node_ids: list[int] = []

    def set_run(self, run):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, *a, **k):  # pragma: no cover - not used
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError


def transport_spec(scheme: str, **over):
    """A ``TransportSpec`` with ``configs/transport/<scheme>.yaml``'s values, changed by ``over``
    (an unknown scheme gets fp32's parameters, so ``TransportSpec`` itself refuses it)."""
    from pathlib import Path

    import yaml

    from fl_client.transport import TransportSpec

    configs = Path(__file__).resolve().parent.parent / "configs" / "transport"
    path = configs / f"{scheme}.yaml"
    base = yaml.safe_load((path if path.is_file() else configs / "fp32.yaml").read_text())
    base.pop("down", None)  # the server's, not in the clients' round config
    return TransportSpec(**{**base, "scheme": scheme, **over})
