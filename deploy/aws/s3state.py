"""The server's run directory in S3 after every round, and ``resume=s3://...`` from there.

A server instance can be terminated at any moment (a spot reclaim, a failed host, a scale-in by
mistake); its disk goes with it. The round hook :class:`StateSync` copies the run directory to
``s3://<bucket>/<prefix>/<run>/`` after each finished round (after ``server_state.npz``, the
metrics and the checkpoints are written), so a new server costs at most the round in flight::

    fedyolo run ... hooks=[deploy.aws.s3state:StateSync]  # FEDYOLO_STATE_URL=s3://bucket/prefix
    fedyolo run resume=s3://bucket/prefix/<run>     # a new instance: fetch, verify, go on

**Layout.** Files are stored by content, ``objects/<sha256>``, and ``sync.json`` maps each
path of the run directory to its sha256 and size. ``sync.json`` is written last, in one PUT
(atomic in S3), so a server killed half-way through an upload leaves the previous round's
complete copy: objects of the new round are added, none of the old one is overwritten. Objects
no longer named by the last two manifests are deleted after the new manifest is in place. A file
that did not change (the held-out images, ``config.yaml``) is uploaded once.

**What never goes to S3**: the clients' shards (``data/client_*``, and the copies the compose
engine exports under ``compose/shards``: client images stay where they are, also in a local
simulation), scratch (``.work``), the control files of the caller bridge, and every private key:
the deployment's Flower home ``.flwr`` (the run CA's key, the SuperLink's, every SuperNode's,
made anew by each engine start) and any other file that holds a PEM or OpenSSH private key.
A key in the bucket would let whoever reads it pass for the SuperLink or any client. A copy is
restored with files 0600 in folders 0700 (the run directory is its owner's).

**Tampering.** ``sync.json`` carries an HMAC-SHA256 over its content with a key that is *not* in
the bucket: ``FEDYOLO_STATE_KEY`` or the SSM SecureString named by
``FEDYOLO_STATE_KEY_PARAMETER`` (``fedyolo deploy aws up`` creates
``/fedyolo/<name>/server/state/key`` and gives only the server's role read access). A fetch
checks the HMAC, every object's sha256 and size, and every path (no absolute path, no ``..``,
nothing of the excluded set) before it writes anything into the run directory; then the state
is read as data only (``fl_server.state``: ``.npz`` with ``allow_pickle=False``), so an object
that someone with write access to the bucket replaced is refused in one line and executes
nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from deploy.aws import AwsError
from fl_server.engines import EventKind, RunDir

LOGGER = logging.getLogger("fedyolo")

ENV_URL = "FEDYOLO_STATE_URL"  # s3://bucket/prefix: where StateSync writes
ENV_KEY = "FEDYOLO_STATE_KEY"  # the HMAC key itself (tests, a machine outside AWS)
ENV_KEY_PARAMETER = "FEDYOLO_STATE_KEY_PARAMETER"  # or the SSM SecureString holding it
KIND = "fedyolo-run-sync"
FORMAT = 1
MANIFEST = "sync.json"
EXCLUDED_DIRS = (".work", "control")  # scratch, the caller bridge's files
SECRET_DIRS = (".flwr",)  # the deployment's Flower home: its config and the run's keys
# the first line of a PEM ("-----BEGIN EC PRIVATE KEY-----", PKCS#8, OpenSSH, encrypted) key
PRIVATE_KEY_MARK = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
MIN_KEY_CHARS = 32


class SyncError(AwsError):
    """A copy in S3 that cannot be used (unsigned, tampered, incomplete) or a missing key."""


# -- addresses and the key ------------------------------------------------------------------
def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, ``some/prefix``) without slashes at the ends."""
    if not str(url).startswith("s3://"):
        raise SyncError(f"state: {url!r} is not an s3://bucket/prefix address")
    bucket, _, prefix = str(url)[5:].partition("/")
    if not bucket:
        raise SyncError(f"state: {url!r} names no bucket")
    return bucket, prefix.strip("/")


def load_key(session: Any = None) -> bytes:
    """The HMAC key: ``FEDYOLO_STATE_KEY``, else the SSM SecureString named by
    ``FEDYOLO_STATE_KEY_PARAMETER``."""
    value = os.environ.get(ENV_KEY)
    if not value and os.environ.get(ENV_KEY_PARAMETER):
        name = os.environ[ENV_KEY_PARAMETER]
        try:
            ssm = (session or _session()).client("ssm")
            value = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        except Exception as e:  # noqa: BLE001 - one line naming the parameter
            raise SyncError(f"state: cannot read the key {name} from SSM: {_one_line(e)}") from e
    if not value:
        raise SyncError(
            f"state: no signing key: set {ENV_KEY} (at least {MIN_KEY_CHARS} characters) or "
            f"{ENV_KEY_PARAMETER} (an SSM SecureString; `fedyolo deploy aws up` makes "
            "/fedyolo/<name>/server/state/key). The copy in S3 is signed so that a tampered object "
            "is refused"
        )
    if len(value) < MIN_KEY_CHARS:
        raise SyncError(f"state: the signing key has {len(value)} characters; use {MIN_KEY_CHARS}+")
    return value.encode()


def _session():
    import boto3

    return boto3.Session()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _signature(key: bytes, doc: dict) -> str:
    body = json.dumps({k: v for k, v in doc.items() if k != "hmac"}, sort_keys=True)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


# -- what is copied -------------------------------------------------------------------------
def excluded(rel: PurePosixPath) -> bool:
    """Whether the run-directory path ``rel`` stays out of the copy (by its name alone)."""
    parts = rel.parts
    return (
        not parts
        or parts[0] in EXCLUDED_DIRS
        or secret_path(rel)
        or parts[0] in (RunDir.INTERRUPT, RunDir.LOCK, RunDir.SERVER_LOCK)
        or (len(parts) > 1 and parts[0] == "data" and parts[1].startswith("client_"))
        or parts[:2] == ("compose", "shards")
        or rel.name.endswith(".tmp")
    )


def secret_path(rel: PurePosixPath) -> bool:
    """A path where a deployment keeps its keys (``.flwr/...``)."""
    return bool(rel.parts) and rel.parts[0] in SECRET_DIRS


def holds_private_key(path: Path) -> bool:
    """Whether the file's first 4 KiB carry a PEM/OpenSSH private key's header."""
    with path.open("rb") as f:
        return PRIVATE_KEY_MARK.search(f.read(4096)) is not None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StateSync:
    """Round hook: the run directory to ``FEDYOLO_STATE_URL``/<run>/ after every round and at
    the end. A failed upload is logged and recorded as a ``state_sync_failed`` event; the run
    goes on (the next round uploads again) and the previous complete copy stays in place."""

    def __init__(self, run_dir: Any, url: str | None = None, session: Any = None):
        self.run = run_dir
        url = url or os.environ.get(ENV_URL)
        if not url:
            raise SyncError(
                f"state: hooks=[deploy.aws.s3state:StateSync] needs {ENV_URL}=s3://bucket/prefix"
            )
        bucket, prefix = split_url(url)
        self.bucket = bucket
        self.base = "/".join(p for p in (prefix, Path(run_dir.path).name) if p)
        self._session = session
        self.key = load_key(session)  # before round 1: a missing key stops the run at once
        self._s3 = None
        self._stored: set[str] | None = None  # objects known to be in the bucket
        self._hashes: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256)
        self._previous: set[str] = set()  # objects named by the manifest before the last

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.base}"

    def s3(self):
        if self._s3 is None:
            self._s3 = (self._session or _session()).client("s3")
        return self._s3

    def on_round(self, record: dict) -> None:
        self._sync(int(record["round"]))
        return None

    def on_end(self, summary: dict) -> None:
        self._sync(int(summary.get("rounds_completed") or 0), final=True)

    def _sync(self, rnd: int, final: bool = False) -> None:
        try:
            n, sent = self.push(rnd)
            LOGGER.info("state: round %d in %s (%d files, %d new objects)", rnd, self.url, n, sent)
        except Exception as e:  # noqa: BLE001 - S3 trouble never costs the round
            reason = _one_line(e)
            LOGGER.warning("state: round %d not copied to %s: %s", rnd, self.url, reason)
            self.run.event(
                rnd, EventKind.STATE_SYNC_FAILED, url=self.url, reason=reason, final=final
            )

    def files(self) -> dict[str, Path]:
        root = Path(self.run.path)
        out = {}
        for p in sorted(root.rglob("*")):
            rel = PurePosixPath(p.relative_to(root).as_posix())
            # a symlink is copied as the file it points to: the held-out images are links
            # into the dataset cache, which a new instance does not have
            if p.is_file() and not excluded(rel):
                out[str(rel)] = p
        return out

    def _hash(self, rel: str, path: Path) -> tuple[str, int]:
        """(sha256, size) of the file, or ("", size) for a file that holds a private key."""
        st = path.stat()
        cached = self._hashes.get(rel)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2], st.st_size
        sha = "" if holds_private_key(path) else _sha256(path)
        if not sha:  # once per version of the file
            LOGGER.warning("state: %s holds a private key: it is not copied to S3", rel)
        self._hashes[rel] = (st.st_size, st.st_mtime_ns, sha)
        return sha, st.st_size

    def _known_objects(self) -> set[str]:
        known = set()
        pages = (
            self.s3()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=f"{self.base}/objects/")
        )
        for page in pages:
            known |= {o["Key"].rsplit("/", 1)[1] for o in page.get("Contents", [])}
        return known

    def push(self, rnd: int) -> tuple[int, int]:
        """Upload what changed, then the signed manifest, then drop unreferenced objects.
        Returns (files in the copy, objects uploaded)."""
        s3 = self.s3()
        if self._stored is None:
            self._stored = self._known_objects()
        entries, sent = {}, 0
        for rel, path in self.files().items():
            sha, size = self._hash(rel, path)
            if not sha:
                continue
            entries[rel] = {"sha256": sha, "size": size}
            if sha not in self._stored:
                with path.open("rb") as body:
                    s3.put_object(Bucket=self.bucket, Key=f"{self.base}/objects/{sha}", Body=body)
                self._stored.add(sha)
                sent += 1
        doc = {
            "kind": KIND,
            "format": FORMAT,
            "run": Path(self.run.path).name,
            "round": rnd,
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": entries,
        }
        doc["hmac"] = _signature(self.key, doc)
        s3.put_object(
            Bucket=self.bucket,
            Key=f"{self.base}/{MANIFEST}",
            Body=json.dumps(doc, indent=1).encode(),
            ContentType="application/json",
        )
        current = {e["sha256"] for e in entries.values()}
        stale = sorted(self._stored - current - self._previous)
        for i in range(0, len(stale), 1000):  # the manifest before this one stays usable
            s3.delete_objects(
                Bucket=self.bucket,
                Delete={
                    "Objects": [{"Key": f"{self.base}/objects/{s}"} for s in stale[i : i + 1000]]
                },
            )
        self._stored -= set(stale)
        self._previous = current
        return len(entries), sent


# -- fetch (resume) -------------------------------------------------------------------------
def _safe_path(rel: str, where: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if (
        not rel
        or p.is_absolute()
        or "\\" in rel
        or any(part in ("..", ".", "") for part in rel.split("/"))
        or excluded(p)
    ):
        raise SyncError(
            f"state: {where} names the path {rel!r}, which a run directory copy never has"
        )
    return p


def read_manifest(url: str, key: bytes, session: Any = None) -> dict:
    """``sync.json`` of the run at ``url`` (``s3://bucket/prefix/<run>``), signature checked."""
    bucket, base = split_url(url)
    where = f"s3://{bucket}/{base}/{MANIFEST}"
    s3 = (session or _session()).client("s3")
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{base}/{MANIFEST}")["Body"].read()
    except Exception as e:  # noqa: BLE001 - NoSuchKey, NoSuchBucket, access denied
        raise SyncError(f"state: {where}: {_one_line(e)} (no copy of that run there?)") from e
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise SyncError(f"state: {where} is not JSON ({_one_line(e)}); refused") from e
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise SyncError(f"state: {where} is not a fedyolo run copy (no '{KIND}' marker); refused")
    if doc.get("format") != FORMAT:
        raise SyncError(f"state: {where}: format {doc.get('format')!r}, expected {FORMAT}")
    if not hmac.compare_digest(str(doc.get("hmac", "")), _signature(key, doc)):
        raise SyncError(
            f"state: {where}: the signature does not match (changed by someone without the "
            "state key, or signed with another key); refused, nothing written"
        )
    if not isinstance(doc.get("files"), dict) or RunDir.STATE not in doc["files"]:
        raise SyncError(f"state: {where} lists no server_state.npz; nothing to resume")
    return doc


def fetch(url: str, dest: Path, session: Any = None) -> dict:
    """Download the copy at ``url`` into ``dest`` (the run directory), every object checked
    before any file is written; files not in the copy (a client's shard) are left alone.
    Files are written 0600 and the folders made 0700; a private key in a copy written before
    keys were kept out is not restored (the engines make the run's keys anew).
    Returns the manifest."""
    key = load_key(session)
    doc = read_manifest(url, key, session)
    bucket, base = split_url(url)
    s3 = (session or _session()).client("s3")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _private_dirs(dest)
    staged: list[tuple[Path, Path]] = []
    keys: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest) as tmp:
        for i, (rel, entry) in enumerate(sorted(doc["files"].items())):
            if secret_path(PurePosixPath(rel)):
                keys.append(rel)
                continue
            p = _safe_path(rel, f"s3://{bucket}/{base}/{MANIFEST}")
            obj = f"{base}/objects/{entry['sha256']}"
            part = Path(tmp) / str(i)
            h = hashlib.sha256()
            try:
                stream = s3.get_object(Bucket=bucket, Key=obj)["Body"]
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), 0o600)
                    while block := stream.read(1 << 20):
                        h.update(block)
                        f.write(block)
            except Exception as e:  # noqa: BLE001
                raise SyncError(f"state: s3://{bucket}/{obj} ({rel}): {_one_line(e)}") from e
            if h.hexdigest() != entry["sha256"] or part.stat().st_size != int(entry["size"]):
                raise SyncError(
                    f"state: s3://{bucket}/{obj} ({rel}) does not match its sha256 in the signed "
                    "manifest: the object was changed; refused, nothing written"
                )
            if holds_private_key(part):
                keys.append(rel)
                continue
            staged.append((part, dest / p))
        for part, target in staged:  # every object checked: now write them all
            _private_dirs(target.parent)
            os.replace(part, target)
    if keys:
        LOGGER.warning(
            "state: s3://%s/%s holds %d private key file(s) (%s): not restored; they were "
            "readable by whoever reads that bucket, delete them there and treat them as leaked",
            bucket,
            base,
            len(keys),
            ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else ""),
        )
    LOGGER.info("state: %s (round %s, %d files) -> %s", url, doc["round"], len(staged), dest)
    return doc


def _private_dirs(folder: Path) -> None:
    """``folder`` and its missing parents made 0700 (folders that exist are left as they are)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700)
        os.chmod(d, 0o700)  # whatever the umask


__all__ = [
    "ENV_KEY",
    "ENV_KEY_PARAMETER",
    "ENV_URL",
    "StateSync",
    "SyncError",
    "fetch",
    "split_url",
]
