"""Certificates made at test time: a CA (the gateway's own in-memory CA code) and the
leaf certificates tests hand to listeners and clients, written as PEM files."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gateway.security import CertificateAuthority, KeyPair

VALIDITY_S = 3600.0
LOCAL_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Leaf:
    """A certificate and its key, as files."""

    cert_file: Path
    key_file: Path

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.cert_file.read_bytes()).serial_number


class PKI:
    """A CA whose certificate is written to `directory/<name>-ca.crt`; `server` and
    `client` issue leaves into the same directory."""

    def __init__(self, directory: Path, name: str = "test") -> None:
        self.directory = directory
        self.name = name
        self.authority = CertificateAuthority(f"{name} CA", time.time(), VALIDITY_S)
        self.ca_file = directory / f"{name}-ca.crt"
        self.ca_file.write_bytes(self.authority.cert_pem)

    def _issue(self, stem: str, hosts: tuple[str, ...], server: bool, client: bool) -> KeyPair:
        return self.authority.issue(
            f"{self.name}-{stem}", time.time(), VALIDITY_S, hosts, server=server, client=client
        )

    def server(self, stem: str = "server", hosts: tuple[str, ...] = LOCAL_HOSTS) -> Leaf:
        """A server certificate for `hosts`."""
        return self.write(stem, self._issue(stem, hosts, server=True, client=False))

    def client(self, stem: str = "client") -> Leaf:
        """A client certificate."""
        return self.write(stem, self._issue(stem, (), server=False, client=True))

    def write(self, stem: str, pair: KeyPair) -> Leaf:
        leaf = Leaf(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        leaf.cert_file.write_bytes(pair.cert_pem)
        leaf.key_file.write_bytes(pair.key_pem)
        return leaf


def replace_atomically(path: Path, data: bytes) -> None:
    """Writes `data` beside `path` and renames it over `path`, as a rotation does."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data)
    os.replace(staged, path)
