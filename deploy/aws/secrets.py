"""The deployment's SecureStrings, written by the CLI after the stack exists (CloudFormation
cannot create SecureString parameters).

The SuperLink certificate must name the address clients dial (the fixed interface's private IP,
a stack output) and what operators dial through Session Manager port forwarding (``localhost``,
``127.0.0.1``), so it is issued once that IP is known. The layout is per role, the only prefix
each role's instances may read (``deploy.aws.cfn.iam``)::

    /fedyolo/<name>/server/tls/{ca.crt, superlink.crt, superlink.key}
    /fedyolo/<name>/server/clients/<i>/pub     one per key slot (the server registers them)
    /fedyolo/<name>/server/state/key           signs the server's copy in S3 (deploy.aws.s3state)
    /fedyolo/<name>/client/tls/ca.crt
    /fedyolo/<name>/client/slots/<i>/key       a slot's private key (SecureString)
    /fedyolo/<name>/client/claims/<i>          written by the client that holds slot <i>

A second ``up`` keeps what exists (a key is never rotated silently); slots added by a larger
``clients.max`` get new keys. Within a group the parameter that marks it complete is written
last (``server/tls/ca.crt``, a slot's ``pub``), so an interrupted write is redone whole.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import tempfile
from pathlib import Path
from typing import Any

from deploy.aws import AwsError

LOGGER = logging.getLogger("fedyolo")

# what operators dial through `aws ssm start-session ... PortForwardingSession`, and the name
# the containers know the SuperLink by
EXTRA_HOSTS = ["superlink", "localhost", "127.0.0.1"]


def prefixes(name: str) -> tuple[str, str]:
    return f"/fedyolo/{name}/server", f"/fedyolo/{name}/client"


def names(name: str, slots: int) -> list[str]:
    """Every parameter the CLI writes for ``slots`` key slots (not the clients' claims)."""
    server, client = prefixes(name)
    out = [f"{server}/tls/ca.crt", f"{server}/tls/superlink.crt", f"{server}/tls/superlink.key"]
    out += [f"{server}/clients/{i}/pub" for i in range(slots)]
    out += [f"{client}/tls/ca.crt"] + [f"{client}/slots/{i}/key" for i in range(slots)]
    return out + [f"{server}/state/key"]


def _existing(ssm: Any, wanted: list[str]) -> dict[str, str]:
    got: dict[str, str] = {}
    for i in range(0, len(wanted), 10):  # get_parameters takes 10 names per call
        reply = ssm.get_parameters(Names=wanted[i : i + 10], WithDecryption=True)
        got.update({p["Name"]: p["Value"] for p in reply["Parameters"]})
    return got


def certificate_hosts(pem: str) -> list[str]:
    """The subject alternative names (DNS names and IPs) of a PEM certificate."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def _put(ssm: Any, tags: list[dict], name: str, value: str) -> None:
    kind = "String" if name.endswith((".crt", "/pub")) else "SecureString"
    ssm.put_parameter(Name=name, Value=value, Type=kind, Tags=tags)


def _replace(ssm: Any, tags: list[dict], values: dict[str, str], have: dict[str, str]) -> None:
    """Write ``values`` in order; a stale one from an interrupted write is deleted first (SSM
    refuses tags with ``Overwrite``)."""
    stale = [n for n in values if n in have]
    for i in range(0, len(stale), 10):
        ssm.delete_parameters(Names=stale[i : i + 10])
    for n, v in values.items():
        _put(ssm, tags, n, v)


def write(ssm: Any, name: str, slots: int, server_ip: str, tags: list[dict]) -> dict:
    """Create what is missing; return ``{"created": [...], "kept": [...]}`` (names)."""
    from deploy.certs import make_node_keys, make_tls

    server, client = prefixes(name)
    have = _existing(ssm, names(name, slots))
    created: list[str] = []
    hosts = [server_ip, *EXTRA_HOSTS]
    with tempfile.TemporaryDirectory(prefix="fedyolo-aws-") as tmp:
        if f"{server}/tls/ca.crt" in have:
            named = certificate_hosts(have.get(f"{server}/tls/superlink.crt", ""))
            if ipaddress.ip_address(server_ip) not in {_ip(h) for h in named}:
                raise AwsError(
                    f"deploy aws up: the SuperLink certificate in {server}/tls/ names "
                    f"{', '.join(named)}, not the interface's {server_ip}: run `fedyolo deploy "
                    "aws down` (deletes the parameters) or delete them, then `up` issues new ones"
                )
        else:
            tls = make_tls(Path(tmp) / "tls", hosts)
            values = {
                f"{server}/tls/superlink.key": tls.key.read_text(),
                f"{server}/tls/superlink.crt": tls.cert.read_text(),
                f"{client}/tls/ca.crt": tls.ca_cert.read_text(),
                f"{server}/tls/ca.crt": tls.ca_cert.read_text(),  # last: the group is complete
            }
            _replace(ssm, tags, values, have)
            created += list(values)
        missing = [str(i) for i in range(slots) if f"{server}/clients/{i}/pub" not in have]
        if missing:
            keys = make_node_keys(Path(tmp) / "keys", missing)
            for slot, k in keys.items():
                values = {
                    f"{client}/slots/{slot}/key": k.private.read_text(),
                    f"{server}/clients/{slot}/pub": k.public.read_text(),  # last
                }
                _replace(ssm, tags, values, have)
                created += list(values)
    if f"{server}/state/key" not in have:
        _put(ssm, tags, f"{server}/state/key", secrets.token_hex(32))
        created.append(f"{server}/state/key")
    kept = sorted(set(have) - set(created))
    LOGGER.info("SSM parameters: %d created, %d kept", len(created), len(kept))
    return {"created": created, "kept": kept}


def _ip(host: str) -> Any:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def delete_all(ssm: Any, name: str) -> list[str]:
    """Delete every parameter under ``/fedyolo/<name>/`` (keys, TLS, claims); return them."""
    found: list[str] = []
    for page in ssm.get_paginator("get_parameters_by_path").paginate(
        Path=f"/fedyolo/{name}/", Recursive=True
    ):
        found += [p["Name"] for p in page["Parameters"]]
    for i in range(0, len(found), 10):
        ssm.delete_parameters(Names=found[i : i + 10])
    return found
