"""The launched workers' side of mTLS without processes: the private CA's files for a
worker start (a private directory, files only their owner reads, a certificate for
the listen host, 127.0.0.1 and localhost, signed by the CA the gateway trusts), the
worker command that names them, the environment a worker is given, and the worker
command line's TLS options."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from backends.worker.server import main as worker_main
from gateway.config import BackendSettings
from gateway.control.supervisor import worker_command, worker_environment
from gateway.security import WorkerPKI


def test_worker_files_are_private_and_name_the_listen_host(tmp_path: Path) -> None:
    pki = WorkerPKI(time.time)
    files = pki.worker_files("small", "10.1.2.3")
    try:
        assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
        for path in (files.cert_file, files.key_file, files.ca_file):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        certificate = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
        ca = x509.load_pem_x509_certificate(files.ca_file.read_bytes())
        certificate.verify_directly_issued_by(ca)
        assert files.ca_file.read_bytes() == pki.ca.cert_pem
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {
            "10.1.2.3",
            "127.0.0.1",
        }
        assert names.get_values_for_type(x509.DNSName) == ["localhost"]
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
        # The gateway's own client certificate comes from the same CA.
        client = x509.load_pem_x509_certificate(pki.client.cert_pem)
        client.verify_directly_issued_by(ca)
    finally:
        files.remove()
    assert not files.directory.exists()


def test_the_worker_command_names_the_files(tmp_path: Path) -> None:
    backend = BackendSettings.model_validate(
        {"name": "small", "address": "127.0.0.1:0", "launch": {"threads": 1}}
    )
    files = WorkerPKI(time.time).worker_files("small", "127.0.0.1")
    try:
        command = worker_command(backend, tmp_path, "127.0.0.1:0", files)
        tail = command[-6:]
        assert tail == [
            "--tls-cert",
            str(files.cert_file),
            "--tls-key",
            str(files.key_file),
            "--tls-client-ca",
            str(files.ca_file),
        ]
    finally:
        files.remove()


def test_the_worker_environment_keeps_no_secret() -> None:
    backend = BackendSettings.model_validate(
        {"name": "small", "address": "127.0.0.1:0", "launch": {"threads": 2}}
    )
    environ = {
        "PATH": "/usr/bin",
        "HOME": "/home/switchyard",
        "SWITCHYARD_ADMIN_TOKEN": "t0ken",
        "AWS_SECRET_ACCESS_KEY": "s",
        "GITHUB_TOKEN": "g",
        "DB_PASSWORD": "p",
        "GOOGLE_APPLICATION_CREDENTIALS": "/keys/sa.json",
        "OPENAI_API_KEY": "k",
    }
    env = worker_environment(backend, environ)
    assert {k: env[k] for k in ("PATH", "HOME", "OMP_NUM_THREADS")} == {
        "PATH": "/usr/bin",
        "HOME": "/home/switchyard",
        "OMP_NUM_THREADS": "2",
    }
    assert not set(env) & (set(environ) - {"PATH", "HOME"})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tls-cert", "a.crt"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "a.key"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.crt"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "absent.crt", "--tls-key", "absent.key"], "cannot read TLS files"),
    ],
)
def test_worker_tls_options_are_checked(
    options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = worker_main(["--repository", str(tmp_path), "--listen", "127.0.0.1:0", *options])
    assert code == 2
    assert message in capsys.readouterr().err
