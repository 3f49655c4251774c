"""TLS certificates and SuperNode keys for a Flower deployment, made per run.

One implementation for every engine that opens a port (``local-deployment`` now, the compose
engine and AWS later): a private CA, a SuperLink certificate whose subject alternative names
cover the addresses clients dial, and one ECDSA key pair per SuperNode in the OpenSSH format
Flower's node authentication reads (``--auth-supernode-private-key``; the public key is
registered with ``flwr supernode register``). Private keys are written 0600 in a 0700 folder;
the CA's key never leaves that folder and signs nothing but this SuperLink's certificate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 30  # a run's certificates; long enough for a long federation, short if they leak


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path  # what SuperNodes and the flwr CLI trust (--root-certificates)
    cert: Path  # the SuperLink's certificate (--ssl-certfile)
    key: Path  # its private key (--ssl-keyfile)


@dataclass(frozen=True)
class NodeKeys:
    private: Path  # --auth-supernode-private-key (OpenSSH format)
    public: Path  # flwr supernode register <public>


def _private_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def _write(path: Path, data: bytes, secret: bool) -> Path:
    """``data`` as ``path``, exactly 0600 if ``secret`` else 0644, whatever was there before.

    Written to a new file and renamed over ``path``: a key file left 0644 by an earlier run or
    a copy is replaced, not rewritten in place (``os.open``'s mode applies only to a file it
    creates, and a descriptor someone opened on the old file would read the new key); a
    symlink put in its place is replaced, never followed."""
    mode = 0o600 if secret else 0o644
    tmp = path.with_name(f".{path.name}.writing")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask cannot loosen or tighten it
        f.write(data)
    os.replace(tmp, path)
    return path


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedyolo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls(folder: Path, hosts: list[str]) -> TLSFiles:
    """A CA and a SuperLink certificate for ``hosts`` (DNS names or IPs) in ``folder``."""
    folder = _private_folder(folder)
    now = dt.datetime.now(dt.UTC)
    until = now + dt.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedyolo run CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    unencrypted = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    _write(folder / "ca.key", ca_key.private_bytes(pem, pkcs8, unencrypted), secret=True)
    return TLSFiles(
        ca_cert=_write(folder / "ca.crt", ca.public_bytes(pem), secret=False),
        cert=_write(folder / "superlink.crt", cert.public_bytes(pem), secret=False),
        key=_write(
            folder / "superlink.key", key.private_bytes(pem, pkcs8, unencrypted), secret=True
        ),
    )


def make_node_keys(folder: Path, names: list[str]) -> dict[str, NodeKeys]:
    """One ECDSA key pair per SuperNode, in OpenSSH format (what Flower's node auth reads)."""
    folder = _private_folder(folder)
    out = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        out[name] = NodeKeys(
            private=_write(folder / name, private, secret=True),
            public=_write(folder / f"{name}.pub", public + b"\n", secret=False),
        )
    return out
