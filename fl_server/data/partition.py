"""Split a dataset into client shards plus a server-only validation set, and write them.

Federated experiments are only comparable when the split is: the partition is a pure
function of (samples, parameters, seed), the server's validation images never reach a
client, and the written shards carry content hashes (``manifest.json``) so a run can
record exactly which data it saw (its data version).

Methods:
- ``iid``: shuffle and deal evenly.
- ``dirichlet``: label skew; per class, client proportions ~ Dir(alpha), each image
  assigned by its dominant class (small alpha = strongly non-IID).
- ``domain``: feature skew; clients get whole domains (e.g. night vs day cameras).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fl_client.data.errors import DataError
from fl_client.data.labels import LabelLineError, read_lines
from fl_server.data.samples import Sample

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("iid", "dirichlet", "domain")
_MAX_FRACTION = 0.9
_CLIENT_DIR = re.compile(r"client_\d+")
_UNKNOWN_DOMAIN = "unknown"


@dataclass
class ClientShard:
    """One client's data: ``train`` for local training, ``val`` for its own local validation."""

    id: int
    train: list[Sample]
    val: list[Sample]

    @property
    def samples(self) -> list[Sample]:
        return [*self.train, *self.val]


@dataclass
class Partition:
    """Client shards plus the server-only validation set, with the parameters that made them."""

    server_val: list[Sample]
    clients: list[ClientShard]
    method: str
    alpha: float
    seed: int
    domain_key: str = "domain"

    @property
    def num_clients(self) -> int:
        return len(self.clients)


# ---------------------------------------------------------------------------- public


def partition(
    samples: Sequence[Sample],
    num_clients: int,
    method: str,
    *,
    alpha: float,
    seed: int,
    server_val_fraction: float,
    client_val_fraction: float,
    domain_key: str = "domain",
) -> Partition:
    """Split ``samples`` into ``num_clients`` shards and a server-only validation set.

    The knobs are the ``data`` config group's (``configs/data/default.yaml`` holds their
    defaults; ``fedyolo data partition`` reads them from there too).

    The server set is carved first, stratified by ``attrs[domain_key]`` so every domain
    is represented; the rest is split by ``method``. Each client keeps
    ``client_val_fraction`` of its shard (at least one image when > 0) for local
    validation. Deterministic for the same samples (in any order) and seed.
    """
    _validate(samples, num_clients, method, alpha, server_val_fraction, client_val_fraction)
    rng = np.random.default_rng(seed)
    ordered = sorted(samples, key=_sort_key)
    server_val, pool = _carve_server_val(ordered, server_val_fraction, domain_key, rng)
    min_train = 2 if method == "dirichlet" else 1
    need = min_train + (1 if client_val_fraction > 0 else 0)
    if len(pool) < num_clients * need:
        raise DataError(
            f"num_clients={num_clients}: too few images ({len(pool)} left after the server "
            f"validation set, each client needs at least {need}); "
            "use fewer clients or a smaller server_val_fraction"
        )
    shards = _SPLITTERS[method](pool, num_clients, rng, alpha, domain_key)
    shards = _rebalance(shards, need, rng)
    clients = [
        _local_split(i, shard, client_val_fraction, min_train, rng)
        for i, shard in enumerate(shards)
    ]
    log.info(
        "partitioned %d images (%s): server_val %d, clients %s",
        len(ordered),
        method,
        len(server_val),
        [len(c.train) + len(c.val) for c in clients],
    )
    return Partition(
        server_val=server_val,
        clients=clients,
        method=method,
        alpha=alpha,
        seed=seed,
        domain_key=domain_key,
    )


def write_partition(part: Partition, names: list[str], out_dir: Path) -> Path:
    """Write the shards as Ultralytics datasets plus ``manifest.json``; return the manifest path.

    Images are symlinks to the originals (absolute targets), labels are copies. Shard
    folders from an earlier call are removed first, so the call is idempotent.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_shards(out_dir)
    hasher = _ImageHasher()
    server_dir = out_dir / "server_val"
    server_records = _write_split(part.server_val, server_dir, "server_val", hasher)
    _write_data_yaml(server_dir, names, train="images", val="images")
    server_hash = _shard_hash(server_records)
    clients = [
        _write_client(shard, out_dir, names, part.domain_key, hasher) for shard in part.clients
    ]
    manifest = {
        "method": part.method,
        "alpha": part.alpha,
        "seed": part.seed,
        "num_clients": part.num_clients,
        "names": list(names),
        "server_val": {"dir": "server_val", "images": len(part.server_val), "sha256": server_hash},
        "clients": clients,
        "data_version": _sha256_text("\n".join([server_hash, *(c["sha256"] for c in clients)])),
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info(
        "wrote %d client shards + server_val to %s (data version %s)",
        part.num_clients,
        out_dir,
        manifest["data_version"][:12],
    )
    return path


# ---------------------------------------------------------------------- validation


def _validate(
    samples: Sequence[Sample],
    num_clients: int,
    method: str,
    alpha: float,
    server_val_fraction: float,
    client_val_fraction: float,
) -> None:
    """Reject bad parameters with one line naming the parameter."""
    if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
        raise DataError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not samples:
        raise DataError("partition: no samples to partition (the dataset is empty)")
    if num_clients > len(samples):
        raise DataError(
            f"num_clients={num_clients} is more than the {len(samples)} images available"
        )
    if method not in METHODS:
        raise DataError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"alpha must be a number > 0, got {alpha!r}")
    for name, value in (
        ("server_val_fraction", server_val_fraction),
        ("client_val_fraction", client_val_fraction),
    ):
        if not (isinstance(value, int | float) and 0 <= value <= _MAX_FRACTION):
            raise DataError(f"{name} must be in [0, {_MAX_FRACTION}], got {value!r}")


# --------------------------------------------------------------------------- splitting


def _sort_key(sample: Sample) -> tuple[str, str, str]:
    return str(sample.image), sample.split, str(sample.label)


def _domain(sample: Sample, key: str) -> str:
    return str(sample.attrs.get(key, _UNKNOWN_DOMAIN))


def _group_by_domain(samples: Sequence[Sample], key: str) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(_domain(sample, key), []).append(sample)
    return {name: groups[name] for name in sorted(groups)}


def _carve_server_val(
    ordered: list[Sample], fraction: float, key: str, rng: np.random.Generator
) -> tuple[list[Sample], list[Sample]]:
    """Take ``fraction`` of every domain (>= 1 each, always leaving clients >= 1) for the server."""
    server, pool = [], []
    for items in _group_by_domain(ordered, key).values():
        count = 0 if fraction == 0 else min(len(items) - 1, max(1, round(len(items) * fraction)))
        perm = rng.permutation(len(items))
        server.extend(items[j] for j in perm[:count])
        pool.extend(items[j] for j in perm[count:])
    return sorted(server, key=_sort_key), sorted(pool, key=_sort_key)


def _split_iid(
    pool: list[Sample], n: int, rng: np.random.Generator, alpha: float, key: str
) -> list[list[Sample]]:
    perm = rng.permutation(len(pool))
    return [[pool[j] for j in perm[i::n]] for i in range(n)]


def _split_dirichlet(
    pool: list[Sample], n: int, rng: np.random.Generator, alpha: float, key: str
) -> list[list[Sample]]:
    """Label skew: per dominant class, client shares ~ Dir(alpha); background dealt evenly."""
    dominant = [dominant_class(s.label) for s in pool]
    shards: list[list[Sample]] = [[] for _ in range(n)]
    for cls in sorted(set(dominant) - {-1}):
        idx = np.array([i for i, c in enumerate(dominant) if c == cls])
        rng.shuffle(idx)
        shares = rng.dirichlet([alpha] * n)
        if not np.all(np.isfinite(shares)) or shares.sum() <= 0:  # tiny alpha can underflow
            shares = np.eye(n)[rng.integers(n)]
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for client, part in enumerate(np.split(idx, cuts)):
            shards[client].extend(pool[i] for i in part)
    background = [i for i, c in enumerate(dominant) if c == -1]
    for k, i in enumerate(rng.permutation(background)):
        shards[k % n].append(pool[i])
    return shards


def _split_domain(
    pool: list[Sample], n: int, rng: np.random.Generator, alpha: float, key: str
) -> list[list[Sample]]:
    """Feature skew: client j gets domain j % D; clients sharing a domain split its images."""
    groups = list(_group_by_domain(pool, key).values())
    shards: list[list[Sample]] = [[] for _ in range(n)]
    if n < len(groups):
        for k, items in enumerate(groups):
            shards[k % n].extend(items)
        return shards
    for k, items in enumerate(groups):
        owners = list(range(k, n, len(groups)))
        for m, j in enumerate(rng.permutation(len(items))):
            shards[owners[m % len(owners)]].append(items[j])
    return shards


_SPLITTERS: dict[
    str, Callable[[list[Sample], int, np.random.Generator, float, str], list[list[Sample]]]
] = {
    "iid": _split_iid,
    "dirichlet": _split_dirichlet,
    "domain": _split_domain,
}


def _rebalance(
    shards: list[list[Sample]], need: int, rng: np.random.Generator
) -> list[list[Sample]]:
    """Move random images from the largest shard until every shard has ``need`` images."""
    moved = 0
    while True:
        sizes = [len(s) for s in shards]
        small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
        if sizes[small] >= need or sizes[big] <= need:
            break
        shards[small].append(shards[big].pop(int(rng.integers(sizes[big]))))
        moved += 1
    if moved:
        log.info("moved %d images between shards so every client has at least %d", moved, need)
    return shards


def _local_split(
    client_id: int, shard: list[Sample], fraction: float, min_train: int, rng: np.random.Generator
) -> ClientShard:
    """Hold out ``fraction`` of a shard (>= 1 image when > 0) for the client's own validation."""
    items = sorted(shard, key=_sort_key)
    count = (
        0 if fraction == 0 else min(len(items) - min_train, max(1, round(len(items) * fraction)))
    )
    perm = rng.permutation(len(items))
    val = sorted((items[j] for j in perm[:count]), key=_sort_key)
    train = sorted((items[j] for j in perm[count:]), key=_sort_key)
    return ClientShard(id=client_id, train=train, val=val)


def label_classes(label: Path | None) -> list[int]:
    """Class ids of a YOLO label file, one per parsable line (empty for no/unreadable file)."""
    if label is None:
        return []
    try:
        return [int(x.cls) for x in read_lines(label) if not isinstance(x, LabelLineError)]
    except (OSError, UnicodeDecodeError):
        return []


def dominant_class(label: Path | None) -> int:
    """Most frequent class in a label (ties -> smallest id); -1 for background."""
    counts = Counter(label_classes(label))
    if not counts:
        return -1
    return min(counts, key=lambda c: (-counts[c], c))


# ---------------------------------------------------------------------------- writing


def _clear_shards(out_dir: Path) -> None:
    """Remove what an earlier write_partition made (and only that)."""
    for child in out_dir.iterdir():
        if (
            child.is_dir()
            and not child.is_symlink()
            and (child.name == "server_val" or _CLIENT_DIR.fullmatch(child.name))
        ):
            shutil.rmtree(child)
    (out_dir / "manifest.json").unlink(missing_ok=True)


def _write_client(
    shard: ClientShard, out_dir: Path, names: list[str], domain_key: str, hasher: _ImageHasher
) -> dict[str, Any]:
    client_dir = out_dir / f"client_{shard.id}"
    records = _write_split(shard.train, client_dir / "train", "train", hasher)
    records += _write_split(shard.val, client_dir / "val", "val", hasher)
    _write_data_yaml(client_dir, names, train="train/images", val="val/images")
    return {
        "id": shard.id,
        "dir": client_dir.name,
        "train_images": len(shard.train),
        "val_images": len(shard.val),
        "class_counts": _class_counts(shard.samples, names),
        "domains": dict(sorted(Counter(_domain(s, domain_key) for s in shard.samples).items())),
        "sha256": _shard_hash(records),
    }


def _write_split(
    samples: Sequence[Sample], split_dir: Path, tag: str, hasher: _ImageHasher
) -> list[tuple[str, str, str]]:
    """Link images and copy labels into ``split_dir``.

    Returns one (tag, image sha256, label text) record per sample, for the shard hash.
    """
    images, labels = split_dir / "images", split_dir / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    records = []
    for k, sample in enumerate(samples):
        stem = f"{k:06d}_{sample.image.stem}"  # the index keeps equal basenames apart
        _link(sample.image, images / f"{stem}{sample.image.suffix}")
        text = sample.label.read_text() if sample.label is not None else ""
        if sample.label is not None:
            (labels / f"{stem}.txt").write_text(text)
        records.append((tag, hasher.sha256(sample.image), text))
    return records


def _link(target: Path, link: Path) -> None:
    """Symlink to the absolute original; copy where the filesystem refuses links."""
    try:
        os.symlink(target.resolve(), link)
    except OSError:
        shutil.copyfile(target, link)


def _write_data_yaml(folder: Path, names: list[str], train: str, val: str) -> None:
    data = {
        "path": str(folder.resolve()),
        "train": train,
        "val": val,
        "nc": len(names),
        "names": dict(enumerate(names)),
    }
    (folder / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _class_counts(samples: Sequence[Sample], names: list[str]) -> dict[str, int]:
    counts = Counter(c for s in samples for c in label_classes(s.label))
    result = {name: counts.get(i, 0) for i, name in enumerate(names)}
    result.update({str(c): n for c, n in sorted(counts.items()) if not 0 <= c < len(names)})
    return result


def _shard_hash(records: list[tuple[str, str, str]]) -> str:
    """sha256 over sorted (split, image sha256, label text) records: content, not paths."""
    return _sha256_text(json.dumps(sorted(records)))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _ImageHasher:
    """sha256 of image files, each file read once per write."""

    def __init__(self) -> None:
        self._cache: dict[Path, str] = {}

    def sha256(self, path: Path) -> str:
        key = path.resolve()
        if key not in self._cache:
            digest = hashlib.sha256()
            with key.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            self._cache[key] = digest.hexdigest()
        return self._cache[key]
