"""TLS for the gateway: the client-facing listeners' credentials (read again when their
files change), the channels to remote backends, and the private certificate authority
that gives launched workers and the gateway the certificates they speak mTLS with.

Listener certificates: `server_credentials` (gRPC, through
grpc.dynamic_ssl_server_credentials, whose fetcher runs before each new connection's
handshake) and `ssl_server_context` (an ssl.SSLContext for HTTP listeners, swapping in
a fresh context when the files changed) read the files of `gateway.tls` again when a
file's mtime, size or inode changed; a change that does not load (a half-written pair)
keeps the last good certificate and is logged once.

Launched workers: `WorkerPKI` makes an EC P-256 CA in memory when the gateway starts
(its key never leaves the process), issues each worker start a server certificate for
its listen host, 127.0.0.1 and localhost, and the gateway a client certificate; a
worker's certificate, key and the CA certificate go to a private directory (0700,
files 0600) that the worker reads at start, and the worker accepts only clients with
a certificate of that CA: only the gateway.

Imports grpc, ssl and cryptography, and the fleet file's settings; nothing of the
planes (the routing core must not import it).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import BackendTLS, ConfigError, ListenerTLS

log = logging.getLogger("switchyard.security")

WORKER_CERT_VALIDITY_S = 30 * 24 * 3600.0
"""How long the private CA and the certificates it issues are valid: a gateway makes a
new CA at each start and issues a worker new certificates at each of its starts."""
CLOCK_SKEW_S = 300.0
"""Certificates are valid from this long before they were made (clocks disagree)."""
GATEWAY_CLIENT_NAME = "switchyard-gateway"
"""The common name of the gateway's client certificate towards launched workers."""


class TLSFileError(ConfigError):
    """A certificate, key or CA file cannot be read, is not PEM, or does not match."""


# -- certificates -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate and its private key, PEM."""

    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def subject_alternative_name(host: str) -> x509.GeneralName:
    """`host` (a name, an IPv4 or an IPv6 address, bracketed or not) as a SAN entry."""
    bare = host.strip("[]")
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        return x509.DNSName(bare)


class CertificateAuthority:
    """A CA held in memory (EC P-256): its certificate can be handed out, its key never
    leaves the object. `now_s` is the wall-clock time (seconds since the epoch) the
    certificates are dated from."""

    def __init__(self, common_name: str, now_s: float, validity_s: float) -> None:
        self._key = _new_key()
        self.name = _name(common_name)
        not_before, not_after = _validity(now_s, validity_s)
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
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
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        now_s: float,
        validity_s: float,
        hosts: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
    ) -> KeyPair:
        """A leaf certificate and its new key: for TLS servers named `hosts` (`server`),
        for TLS clients (`client`), or both."""
        key = _new_key()
        not_before, not_after = _validity(now_s, validity_s)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if hosts:
            names = list(dict.fromkeys(subject_alternative_name(h) for h in hosts))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return KeyPair(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _validity(now_s: float, validity_s: float) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.fromtimestamp(now_s, datetime.UTC)
    return (
        now - datetime.timedelta(seconds=CLOCK_SKEW_S),
        now + datetime.timedelta(seconds=validity_s),
    )


# -- launched workers ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerFiles:
    """One worker start's certificate, key and the CA certificate, in a private
    directory; the worker's `--tls-cert`, `--tls-key` and `--tls-client-ca`."""

    directory: Path
    cert_file: Path
    key_file: Path
    ca_file: Path

    def arguments(self) -> list[str]:
        """The worker's command-line options that name these files."""
        return [
            "--tls-cert",
            str(self.cert_file),
            "--tls-key",
            str(self.key_file),
            "--tls-client-ca",
            str(self.ca_file),
        ]

    def remove(self) -> None:
        """Deletes the directory (the worker has read its files once it listens)."""
        shutil.rmtree(self.directory, ignore_errors=True)


class WorkerPKI:
    """The gateway's private CA for its launched workers, its client certificate
    towards them, and the files each worker start is given. `wall_clock_s` reads the
    wall-clock time (seconds since the epoch) certificates are dated from."""

    def __init__(
        self, wall_clock_s: Callable[[], float], validity_s: float = WORKER_CERT_VALIDITY_S
    ) -> None:
        self._clock = wall_clock_s
        self._validity_s = validity_s
        self.ca = CertificateAuthority("switchyard worker CA", wall_clock_s(), validity_s)
        self.client = self.ca.issue(GATEWAY_CLIENT_NAME, wall_clock_s(), validity_s, client=True)
        self.security = ChannelSecurity(
            grpc.ssl_channel_credentials(
                root_certificates=self.ca.cert_pem,
                private_key=self.client.key_pem,
                certificate_chain=self.client.cert_pem,
            )
        )
        """How the gateway's channels to launched workers are secured."""

    def worker_files(self, name: str, listen_host: str) -> WorkerFiles:
        """A new server certificate for the worker `name` listening on `listen_host`
        (also valid for 127.0.0.1 and localhost), written with its key and the CA
        certificate to a new private directory."""
        issued = self.ca.issue(
            f"switchyard-backend-{name}",
            self._clock(),
            self._validity_s,
            hosts=(listen_host, "127.0.0.1", "localhost"),
            server=True,
        )
        directory = Path(tempfile.mkdtemp(prefix=f"switchyard-{name}-"))  # mode 0700
        files = WorkerFiles(
            directory, directory / "worker.crt", directory / "worker.key", directory / "ca.crt"
        )
        try:
            _write_private(files.key_file, issued.key_pem)
            _write_private(files.cert_file, issued.cert_pem)
            _write_private(files.ca_file, self.ca.cert_pem)
        except OSError:
            files.remove()
            raise
        return files


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


# -- listeners ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenerMaterial:
    """A listener's certificate chain, key and client CAs (None: no client
    certificates asked for), read and checked."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSFileError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _certificates(pem: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TLSFileError(f"the {what} {path} holds no PEM certificate: {exc}") from exc


def read_listener(tls: ListenerTLS) -> ListenerMaterial:
    """`tls`'s files, checked: the certificate parses and matches the key, and the
    client CA file holds certificates. TLSFileError names the file that does not."""
    cert_pem = _read(tls.cert_file, "certificate file")
    key_pem = _read(tls.key_file, "key file")
    leaf = _certificates(cert_pem, tls.cert_file, "certificate file")[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TLSFileError(
            f"the key file {tls.key_file} holds no unencrypted PEM private key: {exc}"
        ) from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        raise TLSFileError(
            f"the key file {tls.key_file} does not hold the key of the certificate {tls.cert_file}"
        )
    client_ca_pem = None
    if tls.client_ca_file is not None:
        client_ca_pem = _read(tls.client_ca_file, "client CA file")
        _certificates(client_ca_pem, tls.client_ca_file, "client CA file")
    return ListenerMaterial(cert_pem, key_pem, client_ca_pem)


Stamp = tuple[tuple[int, int, int] | None, ...]


class ListenerFiles:
    """A listener's TLS files, read again when they change: `changed` (safe from any
    thread) gives the new material once a file's mtime, size or inode moved and the
    files load; a change that does not load is logged once and the last good
    material stays."""

    def __init__(self, tls: ListenerTLS) -> None:
        self.tls = tls
        self._paths = [p for p in (tls.cert_file, tls.key_file, tls.client_ca_file) if p]
        self._lock = threading.Lock()
        self._stamp = self._stamp_now()
        self.material = read_listener(tls)
        """The material in use (TLSFileError at start when it does not load)."""
        self._failed: Stamp | None = None
        self.reloads = 0
        """How many times changed files were taken up."""

    def _stamp_now(self) -> Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                st = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def changed(self) -> ListenerMaterial | None:
        """The new material when the files changed and load; else None."""
        with self._lock:
            stamp = self._stamp_now()
            if stamp == self._stamp or stamp == self._failed:
                return None
            try:
                material = read_listener(self.tls)
            except TLSFileError as exc:
                self._failed = stamp
                log.warning("TLS files changed but do not load, keeping the last ones: %s", exc)
                return None
            self._stamp, self._failed, self.material = stamp, None, material
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.tls.cert_file)
            return material


def _certificate_configuration(material: ListenerMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key_pem, material.cert_pem)], root_certificates=material.client_ca_pem
    )


def server_credentials(tls: ListenerTLS) -> grpc.ServerCredentials:
    """gRPC server credentials from `tls`'s files, read again by the first connection
    after they changed; client certificates required when `client_ca_file` is set.
    TLSFileError when the files do not load at start."""
    files = ListenerFiles(tls)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        material = files.changed()
        return None if material is None else _certificate_configuration(material)

    return grpc.dynamic_ssl_server_credentials(
        _certificate_configuration(files.material),
        fetch,
        require_client_authentication=tls.client_ca_file is not None,
    )


def ssl_server_context(tls: ListenerTLS) -> ssl.SSLContext:
    """An ssl.SSLContext for an HTTP listener (a REST server) from `tls`'s files, with
    the gRPC listeners' rules: client certificates required when `client_ca_file` is
    set, and the files read again by the first connection after they changed (each
    handshake's server-name callback swaps in a context made from the new files).
    TLSFileError when the files do not load at start."""
    files = ListenerFiles(tls)
    current = [_context_from_files(tls)]

    def on_hello(sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object) -> None:
        if files.changed() is not None:
            try:
                current[0] = _context_from_files(tls)
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS files changed but do not load, keeping the last ones: %s", exc)
        if sock.context is not current[0]:
            sock.context = current[0]

    outer = _context_from_files(tls)
    outer.sni_callback = on_hello
    return outer


def _context_from_files(tls: ListenerTLS) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        context.load_verify_locations(cafile=tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def is_loopback(host_port: str) -> bool:
    """Whether HOST:PORT names a loopback address (127.0.0.0/8, ::1, localhost)."""
    host = host_port.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- clients ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelSecurity:
    """How a channel is secured: its credentials, and the name the server's
    certificate is checked against when it is not the address's host."""

    credentials: grpc.ChannelCredentials
    server_name: str | None = None

    def options(self) -> list[tuple[str, str]]:
        """The channel options that go with the credentials."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def client_security(
    ca_file: Path | None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    server_name: str | None = None,
) -> ChannelSecurity:
    """A TLS channel's security from files: the CAs that sign the server's certificate
    (None: the system's), and a client certificate and key for mTLS. TLSFileError
    names a file that cannot be read or parsed."""
    if (cert_file is None) != (key_file is None):
        raise TLSFileError("a client certificate and its key go together")
    root = None
    if ca_file is not None:
        root = _read(ca_file, "CA file")
        _certificates(root, ca_file, "CA file")
    cert_pem = key_pem = None
    if cert_file is not None and key_file is not None:
        cert_pem = _read(cert_file, "client certificate file")
        _certificates(cert_pem, cert_file, "client certificate file")
        key_pem = _read(key_file, "client key file")
    return ChannelSecurity(
        grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key_pem, certificate_chain=cert_pem
        ),
        server_name,
    )


def backend_security(tls: BackendTLS) -> ChannelSecurity:
    """The security of the gateway's channel to a remote backend with `tls`."""
    return client_security(tls.ca_file, tls.cert_file, tls.key_file, tls.server_name)


def secure_channel(
    target: str, security: ChannelSecurity | None, options: Sequence[tuple[str, object]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel to `target`: TLS with `security`, plaintext with None."""
    if security is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(
        target, security.credentials, options=[*options, *security.options()]
    )
