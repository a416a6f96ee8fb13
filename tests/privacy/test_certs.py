"""Tests for privacy.certs: TLS material, SuperNode auth keys, file safety, real handshakes."""

import argparse
import datetime as dt
import ipaddress
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from privacy.certs import (
    CertPaths,
    NodeKeyPaths,
    create_node_keys,
    init_ca_and_superlink,
    verify_chain,
)

HOSTS = ["superlink.example.org", "localhost", "127.0.0.1", "::1"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _all_files(paths: CertPaths | NodeKeyPaths) -> list[Path]:
    return list(vars(paths).values())


@pytest.fixture
def pki(tmp_path: Path) -> CertPaths:
    return init_ca_and_superlink(tmp_path / "pki", HOSTS)


# --- certificates -------------------------------------------------------------------------


def test_san_has_exactly_the_given_hosts_with_correct_types(pki: CertPaths) -> None:
    san = _cert(pki.server_crt).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.IPv4Address("127.0.0.1"),
        ipaddress.IPv6Address("::1"),
    ]


def test_localhost_is_not_added_silently(tmp_path: Path) -> None:
    paths = init_ca_and_superlink(tmp_path, ["10.0.0.5", "superlink"])
    san = _cert(paths.server_crt).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["superlink"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("10.0.0.5")]


def test_ca_and_server_extensions_and_key_formats(pki: CertPaths) -> None:
    ca, server = _cert(pki.ca_crt), _cert(pki.server_crt)

    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_ku.key_cert_sign and ca_ku.crl_sign
    assert ca.subject == ca.issuer

    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.issuer == ca.subject
    assert server.not_valid_after_utc - server.not_valid_before_utc > dt.timedelta(days=364)

    for key_path in (pki.ca_key, pki.server_key):
        pem = key_path.read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # unencrypted PKCS8
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP384R1)
    server_key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert server_key.public_key() == server.public_key()


def test_verify_chain_accepts_own_ca_and_rejects_other_ca(pki: CertPaths, tmp_path: Path) -> None:
    verify_chain(pki.ca_crt, pki.server_crt)

    other = init_ca_and_superlink(tmp_path / "other", HOSTS)
    with pytest.raises(ValueError, match="not issued by the CA"):
        verify_chain(other.ca_crt, pki.server_crt)


def test_verify_chain_rejects_expired_and_not_yet_valid(tmp_path: Path) -> None:
    paths = init_ca_and_superlink(tmp_path, ["superlink"], days=1)
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError, match="expired"):
        verify_chain(paths.ca_crt, paths.server_crt, at=now + dt.timedelta(days=2))
    with pytest.raises(ValueError, match="not valid before"):
        verify_chain(paths.ca_crt, paths.server_crt, at=now - dt.timedelta(days=1))


def test_verify_chain_rejects_leaf_used_as_ca(pki: CertPaths) -> None:
    with pytest.raises(ValueError, match="not a CA"):
        verify_chain(pki.server_crt, pki.server_crt)


@pytest.mark.parametrize("hosts", [[], ["superlink:9092"], ["https://superlink"], ["bad host"], ["-x.org"]])
def test_invalid_hosts_are_rejected(tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(ValueError):
        init_ca_and_superlink(tmp_path / "pki", hosts)
    assert not (tmp_path / "pki").exists()


def test_hosts_as_single_string_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        init_ca_and_superlink(tmp_path, "localhost")  # type: ignore[arg-type]


# --- file safety ----------------------------------------------------------------------------


def test_file_and_directory_modes(tmp_path: Path) -> None:
    out = tmp_path / "a" / "pki"
    paths = init_ca_and_superlink(out, HOSTS)
    node = create_node_keys("hospital-a", out)

    assert _mode(out) == 0o700
    for private in (paths.ca_key, paths.server_key, node.private_key):
        assert _mode(private) == 0o600
    for public in (paths.ca_crt, paths.server_crt, node.public_key):
        assert _mode(public) == 0o644
    # No staging leftovers.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ca.key", "ca.crt", "server.key", "server.crt", "hospital-a.key", "hospital-a.pub"]
    )


def test_refusal_writes_nothing_and_keeps_existing_bytes(tmp_path: Path) -> None:
    existing = tmp_path / "server.crt"
    existing.write_bytes(b"operator's certificate")

    with pytest.raises(FileExistsError, match=r"server\.crt") as info:
        init_ca_and_superlink(tmp_path, HOSTS)

    assert "--force" in str(info.value)
    assert existing.read_bytes() == b"operator's certificate"
    assert [p.name for p in tmp_path.iterdir()] == ["server.crt"]


def test_refusal_names_every_existing_file(pki: CertPaths) -> None:
    before = {path: path.read_bytes() for path in _all_files(pki)}
    with pytest.raises(FileExistsError) as info:
        init_ca_and_superlink(pki.ca_crt.parent, HOSTS)
    for path in before:
        assert str(path) in str(info.value)
    assert {path: path.read_bytes() for path in before} == before


def test_force_overwrites_everything(pki: CertPaths) -> None:
    before = {path: path.read_bytes() for path in _all_files(pki)}
    pki.ca_key.chmod(0o644)  # a loosened mode must not survive the rewrite

    again = init_ca_and_superlink(pki.ca_crt.parent, ["superlink"], force=True)

    assert again == pki
    for path, old in before.items():
        assert path.read_bytes() != old
    assert _mode(pki.ca_key) == 0o600
    verify_chain(again.ca_crt, again.server_crt)


# --- SuperNode authentication keys ----------------------------------------------------------


def test_node_key_formats(tmp_path: Path) -> None:
    paths = create_node_keys("hospital_a", tmp_path)
    assert paths == NodeKeyPaths(tmp_path / "hospital_a.key", tmp_path / "hospital_a.pub")

    public_text = paths.public_key.read_bytes()
    assert public_text.startswith(b"ecdsa-sha2-nistp384 AAAA")
    assert public_text.endswith(b" hospital_a\n")
    public = serialization.load_ssh_public_key(public_text)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP384R1)

    private_text = paths.private_key.read_bytes()
    assert private_text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(private_text, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key() == public


def test_node_keys_load_with_flower_code(tmp_path: Path) -> None:
    # The exact functions behind `flower-supernode --auth-supernode-private-key` and
    # `flwr supernode register <public key>`.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    paths = create_node_keys("hospital-b", tmp_path)
    args = argparse.Namespace(
        auth_supernode_private_key=str(paths.private_key), auth_supernode_public_key=None
    )
    loaded = _try_setup_client_authentication(args)
    assert loaded is not None
    private, public = loaded
    assert isinstance(private, ec.EllipticCurvePrivateKey)

    # What the operator registers must be the key the SuperNode presents.
    assert try_load_public_key(paths.public_key) == public_key_to_bytes(public)


def test_node_keys_refuse_overwrite_and_force(tmp_path: Path) -> None:
    paths = create_node_keys("hospital-c", tmp_path)
    before = paths.private_key.read_bytes()
    paths.public_key.unlink()  # half a pair left behind still blocks the whole pair

    with pytest.raises(FileExistsError, match=r"hospital-c\.key.*--force"):
        create_node_keys("hospital-c", tmp_path)
    assert paths.private_key.read_bytes() == before
    assert not paths.public_key.exists()

    create_node_keys("hospital-c", tmp_path, force=True)
    assert paths.private_key.read_bytes() != before
    assert _mode(paths.private_key) == 0o600
    assert _mode(paths.public_key) == 0o644


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "../etc", "hospital a", "hospital.a", "häuser", "ca", "server"]
)
def test_invalid_node_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="Invalid node name") as info:
        create_node_keys(name, tmp_path / "nodes")
    assert repr(name) in str(info.value)
    assert not (tmp_path / "nodes").exists()


@pytest.mark.parametrize("name", ["a" * 64, "Hospital_A-01", "7"])
def test_valid_node_names(tmp_path: Path, name: str) -> None:
    paths = create_node_keys(name, tmp_path)
    assert paths.private_key.name == f"{name}.key"


# --- real gRPC TLS handshakes ---------------------------------------------------------------


def _grpc_server(paths: CertPaths) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    _add_health(server)
    credentials = grpc.ssl_server_credentials(
        [(paths.server_key.read_bytes(), paths.server_crt.read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.bound_address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    return server


def _flower_server(paths: CertPaths) -> grpc.Server:
    # Flower's own server factory, fed the (CA, cert, key) tuple the SuperLink reads from
    # --ssl-ca-certfile / --ssl-certfile / --ssl-keyfile.
    from flwr.supercore.grpc import generic_create_grpc_server

    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    certificates = (
        paths.ca_crt.read_bytes(),
        paths.server_crt.read_bytes(),
        paths.server_key.read_bytes(),
    )
    return generic_create_grpc_server(
        (servicer, health_pb2_grpc.add_HealthServicer_to_server),
        "127.0.0.1:0",
        max_concurrent_workers=4,
        certificates=certificates,
    )


def _add_health(server: grpc.Server) -> None:
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


@contextmanager
def _running(server: grpc.Server) -> Iterator[str]:
    server.start()
    try:
        yield server.bound_address  # type: ignore[attr-defined]
    finally:
        server.stop(grace=None)


def _check(address: str, ca_crt: Path, *, target_name: str | None = None) -> int:
    options = [] if target_name is None else [("grpc.ssl_target_name_override", target_name)]
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_crt.read_bytes())
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


@pytest.mark.parametrize("make_server", [_grpc_server, _flower_server], ids=["grpc", "flower"])
def test_tls_handshake_with_ca_succeeds_and_other_ca_fails(
    pki: CertPaths, tmp_path: Path, make_server: Callable[[CertPaths], grpc.Server]
) -> None:
    other = init_ca_and_superlink(tmp_path / "other", HOSTS)
    with _running(make_server(pki)) as address:
        assert _check(address, pki.ca_crt) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            _check(address, other.ca_crt)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_handshake_enforces_san(tmp_path: Path) -> None:
    # Only a DNS name is certified: dialling 127.0.0.1 must fail, the certified name must work.
    paths = init_ca_and_superlink(tmp_path, ["superlink.example.org"])
    with _running(_grpc_server(paths)) as address:
        with pytest.raises(grpc.RpcError):
            _check(address, paths.ca_crt)
        status = _check(address, paths.ca_crt, target_name="superlink.example.org")
        assert status == health_pb2.HealthCheckResponse.SERVING
