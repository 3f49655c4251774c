"""``fedyolo deploy aws data upload <partition folder>``: each slot's shard into S3.

A client instance has no data until something puts its shard where its SuperNode reads it
(node config ``data-path``). The route for a newcomer: ``fedyolo data partition <data> <out>
--clients N`` writes ``out/server_val`` (the server's held-out set) and ``out/client_<i>``;
this command puts them into the deployment's state bucket::

    out/server_val/  ->  s3://<bucket>/data/server/
    out/client_<i>/  ->  s3://<bucket>/data/slot-<i>/

and the instances fetch their own part with ``aws s3 sync s3://<bucket>/data/slot-<i>/ <dir>``
(the server: ``data/server/``), then check it with ``sha256sum -c SHA256SUMS`` in ``<dir>``.

**Portable.** A partition's images are links to the original dataset and its ``data.yaml``
names an absolute ``path``: links are uploaded as their targets' content and each
``data.yaml`` loses ``path`` (its folder is then its root, for fedyolo and Ultralytics alike),
so a synced folder reads the same wherever it lands (``/data`` in a client container).

**Checked, and sent once.** Each prefix gets ``SHA256SUMS`` (``sha256sum`` format: one line per
file), written after its files; a file whose sha256 the prefix's previous ``SHA256SUMS``
already names (and whose object is there) is not uploaded again. Objects of the prefix that
the new list does not name are deleted (``aws s3 sync`` would bring them back otherwise), and
so are the prefixes of slots the partition no longer has.

**Slots.** Slot ``i`` is client ``i``: the group's instance that claims slot ``i`` trains
``client_<i>``. More client folders than ``clients.max`` (the key slots) is refused in one line,
before anything is uploaded.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.aws import AwsError

LOGGER = logging.getLogger("fedyolo")

PREFIX = "data"
SERVER_PART = "server_val"  # the folder `fedyolo data partition` writes (fl_server.data.partition)
CLIENT_PART = re.compile(r"client_(\d+)")
SUMS = "SHA256SUMS"


@dataclass(frozen=True)
class Part:
    """One folder of the partition and the S3 prefix it goes to."""

    folder: Path
    prefix: str  # data/server/ or data/slot-<i>/


def server_prefix() -> str:
    return f"{PREFIX}/server/"


def slot_prefix(slot: int) -> str:
    return f"{PREFIX}/slot-{slot}/"


def parts(folder: Path, slots: int) -> list[Part]:
    """The server part and each client part of ``folder``, checked; one line if it is not a
    partition folder or has more client folders than ``slots``."""
    if not (folder / SERVER_PART / "data.yaml").is_file():
        raise AwsError(
            f"deploy aws data upload: {folder} has no {SERVER_PART}/data.yaml: give the folder "
            "`fedyolo data partition <data> <out> --clients N` wrote"
        )
    clients = sorted(
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if p.is_dir() and (m := CLIENT_PART.fullmatch(p.name))
    )
    if not clients:
        raise AwsError(f"deploy aws data upload: {folder} has no client_<i> folder")
    ids = [i for i, _ in clients]
    if len(clients) > slots or ids != list(range(len(clients))):
        raise AwsError(
            f"deploy aws data upload: {folder} has client folders {ids[:8]}, but the deployment "
            f"has {slots} slots (clients.max={slots}): partition again with --clients "
            f"{min(len(clients), slots)} (client_0..client_{slots - 1} at most), or raise "
            "clients.max"
        )
    for _, p in clients:
        if not (p / "data.yaml").is_file():
            raise AwsError(f"deploy aws data upload: {p} has no data.yaml")
    return [
        Part(folder / SERVER_PART, server_prefix()),
        *(Part(p, slot_prefix(i)) for i, p in clients),
    ]


def portable_data_yaml(text: str) -> bytes:
    """A ``data.yaml`` without ``path``: its folder is its root, wherever it is synced to."""
    data = yaml.safe_load(text)
    data.pop("path", None)
    return yaml.safe_dump(data, sort_keys=False).encode()


def part_files(folder: Path) -> dict[str, bytes | Path]:
    """Relative path -> content (``data.yaml``, rewritten) or the file to read (a link's
    target); caches and earlier ``SHA256SUMS`` left out."""
    files: dict[str, bytes | Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() or p.suffix == ".cache" or rel == SUMS:
            continue
        if not p.exists():
            raise AwsError(f"deploy aws data upload: {p} is a link to nothing ({p.readlink()})")
        files[rel] = portable_data_yaml(p.read_text()) if rel == "data.yaml" else p.resolve()
    return files


def _sha256(content: bytes | Path) -> str:
    if isinstance(content, bytes):
        return hashlib.sha256(content).hexdigest()
    h = hashlib.sha256()
    with content.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sums_text(sums: dict[str, str]) -> str:
    """``sha256sum`` format, so an instance checks its copy with ``sha256sum -c``."""
    return "".join(f"{digest}  {rel}\n" for rel, digest in sorted(sums.items()))


def parse_sums(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, sep, rel = line.partition("  ")
        if sep and len(digest) == 64:
            out[rel] = digest
    return out


def _listing(s3, bucket: str, prefix: str) -> dict[str, int]:
    keys: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update({o["Key"]: int(o["Size"]) for o in page.get("Contents", [])})
    return keys


def _previous_sums(s3, bucket: str, prefix: str, listed: dict[str, int]) -> dict[str, str]:
    if prefix + SUMS not in listed:
        return {}
    body = s3.get_object(Bucket=bucket, Key=prefix + SUMS)["Body"].read()
    return parse_sums(body.decode(errors="replace"))


def upload_part(s3, bucket: str, part: Part) -> dict[str, Any]:
    """One part to its prefix (see the module docstring); its counts."""
    files = part_files(part.folder)
    sums = {rel: _sha256(content) for rel, content in files.items()}
    listed = _listing(s3, bucket, part.prefix)
    before = _previous_sums(s3, bucket, part.prefix, listed)
    sent = 0
    for rel, content in files.items():
        key = part.prefix + rel
        if before.get(rel) == sums[rel] and key in listed:
            continue
        body = content if isinstance(content, bytes) else content.read_bytes()
        s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"sha256": sums[rel]})
        sent += 1
    s3.put_object(Bucket=bucket, Key=part.prefix + SUMS, Body=sums_text(sums).encode())
    stale = sorted(set(listed) - {part.prefix + rel for rel in files} - {part.prefix + SUMS})
    _delete(s3, bucket, stale)
    return {
        "prefix": part.prefix,
        "files": len(files),
        "uploaded": sent,
        "unchanged": len(files) - sent,
        "deleted": len(stale),
    }


def _delete(s3, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        chunk = keys[i : i + 1000]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk]})


def upload(cfg: Any, folder: Path, sess: Any = None) -> list[dict[str, Any]]:
    """The partition ``folder`` into the deployment's bucket (``deploy.aws.stack``'s name for
    it); one row per prefix, and one per removed slot prefix."""
    from botocore.exceptions import BotoCoreError, ClientError

    from deploy.aws import stack

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AwsError(f"deploy aws data upload: {folder} is not a folder")
    todo = parts(folder, int(cfg.clients.max))
    ctx = stack.Context(cfg, sess or stack.session())
    s3 = ctx.client("s3")
    bucket = f"{cfg.name}-state-<account>-{cfg.region}"
    try:
        bucket = ctx.bucket  # one STS call
        rows = [upload_part(s3, bucket, part) for part in todo]
        slots = len(todo) - 1
        old = sorted(
            k
            for k in _listing(s3, bucket, f"{PREFIX}/slot-")
            if int(k.split("/")[1].removeprefix("slot-")) >= slots
        )
        _delete(s3, bucket, old)
        for prefix in sorted({"/".join(k.split("/")[:2]) + "/" for k in old}):
            rows.append({"prefix": prefix, "files": 0, "uploaded": 0, "unchanged": 0,
                         "deleted": sum(k.startswith(prefix) for k in old)})  # fmt: skip
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "AccessDenied", "403", "404"):
            raise AwsError(
                f"deploy aws data upload: bucket {bucket}: {code}; run `fedyolo deploy aws "
                f"up` for deployment {cfg.name} first (in {cfg.region}, with your account)"
            ) from None
        raise
    except BotoCoreError as e:
        raise AwsError(f"deploy aws data upload: {e}") from None
    for r in rows:
        LOGGER.info(
            "s3://%s/%s: %d files, %d uploaded, %d unchanged, %d deleted",
            bucket, r["prefix"], r["files"], r["uploaded"], r["unchanged"], r["deleted"],
        )  # fmt: skip
    return rows
