"""TLS certificates and SuperNode authentication keys for a Flower 1.41 deployment."""

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
DIR_MODE = 0o700

# Flower's SuperNode auth accepts only NIST-curve EC keys (flwr.cli.supernode.register
# .try_load_public_key); P-384 matches the documented `ssh-keygen -t ecdsa -b 384`. gRPC's
# BoringSSL serves ECDSA certificates fine, so TLS uses the same curve.
_CURVE = ec.SECP384R1
_SIGNATURE_HASH = hashes.SHA384
# Back-date notBefore so a SuperNode whose clock lags slightly still accepts the certificate.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_ORGANIZATION = "MindFed"
_NODE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Node keys share a directory with the TLS material in the usual layout; these names would
# collide with ca.key / server.key.
_RESERVED_NODE_NAMES = frozenset({"ca", "server"})
# Underscores are not valid in hostnames but Docker Compose service names use them.
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


@dataclass(frozen=True)
class CertPaths:
    """Files written by `init_ca_and_superlink`."""

    ca_key: Path
    ca_crt: Path
    server_key: Path
    server_crt: Path


@dataclass(frozen=True)
class NodeKeyPaths:
    """Files written by `create_node_keys`."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class _PendingFile:
    path: Path
    data: bytes
    mode: int


def init_ca_and_superlink(
    out_dir: Path, hosts: list[str], *, force: bool = False, days: int = 365
) -> CertPaths:
    """Create a self-signed CA and a SuperLink TLS certificate signed by it.

    The SuperLink gets `--ssl-ca-certfile ca.crt --ssl-certfile server.crt
    --ssl-keyfile server.key`; every SuperNode gets `--root-certificates ca.crt`. Only the
    given `hosts` are put in the certificate's SubjectAlternativeName, so SuperNodes must dial
    one of them. `force=True` also replaces the CA, so ca.crt must be redistributed.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    alt_names = _parse_hosts(hosts)
    out_dir = Path(out_dir)
    paths = CertPaths(
        ca_key=out_dir / "ca.key",
        ca_crt=out_dir / "ca.crt",
        server_key=out_dir / "server.key",
        server_crt=out_dir / "server.crt",
    )
    # Fail before generating keys; `_write_all` checks again right before writing.
    _check_targets([paths.ca_key, paths.ca_crt, paths.server_key, paths.server_crt], force)

    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(_CURVE())
    ca_cert = _build_ca_cert(ca_key, now, not_after)
    server_key = ec.generate_private_key(_CURVE())
    server_cert = _build_server_cert(server_key, ca_key, ca_cert, alt_names, now, not_after)

    _write_all(
        [
            _PendingFile(paths.ca_key, _private_pkcs8_pem(ca_key), PRIVATE_FILE_MODE),
            _PendingFile(paths.ca_crt, _cert_pem(ca_cert), PUBLIC_FILE_MODE),
            _PendingFile(paths.server_key, _private_pkcs8_pem(server_key), PRIVATE_FILE_MODE),
            _PendingFile(paths.server_crt, _cert_pem(server_cert), PUBLIC_FILE_MODE),
        ],
        force=force,
    )
    return paths


def create_node_keys(name: str, out_dir: Path, *, force: bool = False) -> NodeKeyPaths:
    """Create a SuperNode authentication key pair `<name>.key` / `<name>.pub`.

    Same formats as `ssh-keygen -t ecdsa -b 384`: the private key is an unencrypted OpenSSH
    PEM key (for `flower-supernode --auth-supernode-private-key`), the public key a single
    `ecdsa-sha2-nistp384 AAAA... <name>` line (for `flwr supernode register`).
    """
    _validate_node_name(name)
    out_dir = Path(out_dir)
    paths = NodeKeyPaths(out_dir / f"{name}.key", out_dir / f"{name}.pub")
    _check_targets([paths.private_key, paths.public_key], force)

    key = ec.generate_private_key(_CURVE())
    private_bytes = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    )
    public_line = key.public_key().public_bytes(
        encoding=serialization.Encoding.OpenSSH,
        format=serialization.PublicFormat.OpenSSH,
    )
    # Trailing comment like ssh-keygen's, so operators can tell registered keys apart.
    public_bytes = public_line + f" {name}\n".encode()

    _write_all(
        [
            _PendingFile(paths.private_key, private_bytes, PRIVATE_FILE_MODE),
            _PendingFile(paths.public_key, public_bytes, PUBLIC_FILE_MODE),
        ],
        force=force,
    )
    return paths


def verify_chain(ca_crt: Path, cert: Path, *, at: dt.datetime | None = None) -> None:
    """Raise ValueError unless `cert` is directly signed by `ca_crt` and both are valid `at`.

    `at` (timezone-aware) defaults to now.
    """
    ca_crt, cert = Path(ca_crt), Path(cert)
    ca = _load_cert(ca_crt)
    leaf = _load_cert(cert)
    moment = dt.datetime.now(dt.UTC) if at is None else at
    if moment.tzinfo is None:
        raise ValueError("`at` must be timezone-aware")

    if not _is_ca(ca):
        raise ValueError(f"{ca_crt} is not a CA certificate (BasicConstraints CA:TRUE missing)")
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        # InvalidSignature has an empty message; name the usual cause instead.
        reason = str(err) or "signature does not match the CA's key"
        raise ValueError(
            f"Certificate {cert} was not issued by the CA in {ca_crt}: {reason}. "
            "SuperNodes must use the ca.crt that signed the SuperLink's certificate."
        ) from err
    for path, certificate in ((ca_crt, ca), (cert, leaf)):
        _check_validity(path, certificate, moment)


def _validate_node_name(name: str) -> None:
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
        raise ValueError(
            f"Invalid node name {name!r}: use 1-64 characters from letters, digits, "
            "'-' and '_' (it becomes the file names <name>.key and <name>.pub)"
        )
    if name in _RESERVED_NODE_NAMES:
        raise ValueError(
            f"Invalid node name {name!r}: reserved because {name}.key is TLS material "
            "written by init_ca_and_superlink"
        )


def _parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    # A bare string would otherwise be iterated character by character.
    if isinstance(hosts, str | bytes):
        raise TypeError("hosts must be a list of host names or IP addresses, not a string")
    names: list[x509.GeneralName] = []
    for host in hosts:
        entry = _parse_host(host)
        if entry not in names:
            names.append(entry)
    if not names:
        raise ValueError("At least one SuperLink host name or IP address is required")
    return names


def _parse_host(host: str) -> x509.GeneralName:
    text = host.strip()
    # Accept the bracketed IPv6 form people copy from addresses like "[::1]:9092".
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    labels = text.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]  # wildcard certificates are legitimate for a SuperLink pool
    if not text or len(text) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"Invalid host {host!r}: expected an IP address or a DNS name such as "
            "'superlink.example.org' (no scheme, port or path)"
        )
    return x509.DNSName(text)


def _build_ca_cert(
    key: ec.EllipticCurvePrivateKey, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{_ORGANIZATION} Federation CA"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before - _CLOCK_SKEW)
        .not_valid_after(not_after)
        # path_length=0: this CA signs leaf certificates only, never intermediates.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _SIGNATURE_HASH())
    )


def _build_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    alt_names: list[x509.GeneralName],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    # TLS clients (gRPC included) match hosts against the SAN only, so the CN is a label;
    # a host name there could also exceed the 64-character CN limit.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{_ORGANIZATION} SuperLink"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDHE-ECDSA handshakes need digitalSignature; nothing else is used.
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _SIGNATURE_HASH())
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise ValueError(f"{path} is not a PEM X.509 certificate: {err}") from err


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_validity(path: Path, cert: x509.Certificate, moment: dt.datetime) -> None:
    if moment < cert.not_valid_before_utc:
        raise ValueError(
            f"Certificate {path} is not valid before {cert.not_valid_before_utc.isoformat()} "
            "(check the system clock)"
        )
    if moment > cert.not_valid_after_utc:
        raise ValueError(
            f"Certificate {path} expired on {cert.not_valid_after_utc.isoformat()}; re-issue it with --force"
        )


def _check_targets(targets: list[Path], force: bool) -> None:
    if force:
        return
    # is_symlink: a dangling link still occupies the name and would be silently replaced.
    existing = [str(path) for path in targets if path.exists() or path.is_symlink()]
    if existing:
        raise FileExistsError(
            f"Refusing to overwrite existing file(s): {', '.join(existing)}. "
            "Nothing was written; use --force to replace them."
        )


def _write_all(files: list[_PendingFile], *, force: bool) -> None:
    """Write every file or none: stage all temp files first, then rename them into place."""
    _check_targets([file.path for file in files], force)
    for directory in {file.path.parent for file in files}:
        _ensure_private_dir(directory)

    staged: list[tuple[Path, Path]] = []
    try:
        for file in files:
            staged.append((_stage(file), file.path))
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    # Everything is on disk by now; same-directory renames are atomic and do not fail for
    # lack of space, so the targets are swapped in together.
    for temp, target in staged:
        os.replace(temp, target)
    for directory in {target.parent for _, target in staged}:
        _fsync_dir(directory)


def _ensure_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory") from None
        return  # an existing directory keeps the permissions its owner chose
    # mkdir's mode is filtered by the umask; set it exactly.
    directory.chmod(DIR_MODE)


def _stage(file: _PendingFile) -> Path:
    temp = file.path.with_name(f".{file.path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL + mode at creation: the key is never readable by others, not even briefly.
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temp, flags, file.mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            # The umask may have removed bits (e.g. 0o644 -> 0o600); set the exact mode.
            os.fchmod(handle.fileno(), file.mode)
            handle.write(file.data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _fsync_dir(directory: Path) -> None:
    # Persist the renames; not every platform/filesystem allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
