"""Per-run TLS material and SuperNode keys: what Flower gets is valid, and secrets stay private."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.certs import make_node_keys, make_tls
from fl_server.config import ConfigError, compose


def test_the_superlink_certificate_is_signed_by_the_run_ca_for_the_dialled_hosts(tmp_path):
    tls = make_tls(tmp_path / "s", ["127.0.0.1", "localhost", "superlink"])
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    for secret in (tls.key, tmp_path / "s" / "ca.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_node_keys_are_openssh_ecdsa_pairs_and_private(tmp_path):
    keys = make_node_keys(tmp_path / "n", ["supernode-0", "supernode-1"])
    a, b = keys["supernode-0"], keys["supernode-1"]
    private = serialization.load_ssh_private_key(a.private.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(a.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert a.public.read_bytes() != b.public.read_bytes()
    assert stat.S_IMODE(a.private.stat().st_mode) == 0o600


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "fleet.example.com"])
def test_plaintext_is_refused_off_loopback(host):
    with pytest.raises(ConfigError, match="loopback"):
        compose(["engine=local-deployment", "engine.insecure=true", f"engine.host={host}"])
    compose(["engine=local-deployment", f"engine.host={host}"])  # TLS + node auth: allowed
    compose(["engine=local-deployment", "engine.insecure=true"])  # 127.0.0.1: allowed
