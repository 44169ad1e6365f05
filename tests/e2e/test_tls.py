"""TLS end to end: `switchyard serve` with `gateway.tls` and a launched worker. The
reference client (tritonclient, in its own process) infers over TLS with the CA's
certificate and fails in plaintext; the launched worker answers only the gateway
(a client in plaintext, or over TLS without the gateway's certificate, gets nothing);
its environment holds none of the gateway's secrets and its key file is gone once it
listens; `switchyard admin` talks to the admin API over TLS; and `switchyard serve`
refuses a plaintext admin API beyond loopback."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.e2e.conftest import (
    ADMIN_TOKEN,
    ROOT,
    SWITCHYARD,
    RunningGateway,
    start_serve,
    stop,
    write_fleet,
)
from tests.integration.security.certs import PKI, Leaf

SECRET_ENV = "UPSTREAM_API_KEY"
"""A secret of the gateway's environment that no worker may inherit."""

TRITON_TLS_CHECK = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, ca, repository = sys.argv[1:4]
x = np.load(repository + "/digits/samples/inputs.npz")["input"]
reference = np.load(repository + "/digits/samples/reference.npz")["label"]
out = {}
client = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=ca)
out["ready"] = client.is_server_ready()
tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
tensor.set_data_from_numpy(x)
result = client.infer("digits", [tensor])
out["labels_match"] = bool((result.as_numpy("label") == reference).all())
out["backend"] = result.get_response().parameters["switchyard_backend"].string_param
try:
    grpcclient.InferenceServerClient(url).is_server_live(client_timeout=5)
    out["plaintext"] = "answered"
except InferenceServerException as exc:
    out["plaintext"] = exc.status()
print(json.dumps(out))
"""

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server that takes
the connection answers with its own SETTINGS frame."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"), "gateway")


@pytest.fixture(scope="module")
def tls_served(
    repository: Path, pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp("tls-serve")
    server = pki.server("listener")
    fleet = write_fleet(
        workdir / "fleet.yaml",
        repository,
        [
            {
                "name": "small",
                "address": "127.0.0.1:0",
                "hardware_class": "cpu-1c",
                "price_usd_per_hour": 0.04,
                "launch": {"threads": 1, "models": ["digits"]},
            }
        ],
        tls={"cert_file": str(server.cert_file), "key_file": str(server.key_file)},
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(SECRET_ENV, "upstream-secret")
        gateway = start_serve(fleet, workdir)
    yield gateway
    stop(gateway)


def worker_address(gateway: RunningGateway) -> str:
    return str(gateway.info["backends"]["small"]["address"])


def worker_pid(gateway: RunningGateway) -> int:
    return int(gateway.info["pids"]["small"])


def h2_answer(address: str, certificate: Leaf | None = None) -> tuple[bytes, bytes | None]:
    """What a TLS client that trusts any server (and presents `certificate`, if given)
    hears after the HTTP/2 preface, and the server's certificate (DER); b"" when
    the server refused the client."""
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if certificate is not None:
        context.load_cert_chain(certificate.cert_file, certificate.key_file)
    peer = None
    try:
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            peer = tls.getpeercert(binary_form=True)
            tls.sendall(H2_PREFACE)
            return tls.recv(1024), peer
    except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
        print(f"{address} refused the client: {exc!r}")
        return b"", peer


def test_tritonclient_infers_over_tls(
    tls_served: RunningGateway, pki: PKI, repository: Path
) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            TRITON_TLS_CHECK,
            tls_served.address,
            str(pki.ca_file),
            str(repository),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["ready"] is True
    assert seen["labels_match"] is True
    assert seen["backend"] == "small"
    assert seen["plaintext"] == "StatusCode.UNAVAILABLE"


def test_the_launched_worker_answers_only_the_gateway(tls_served: RunningGateway, pki: PKI) -> None:
    address = worker_address(tls_served)
    # The probe hears a gRPC server that takes it: the gateway's listener (TLS, no
    # client certificates asked for) answers with its SETTINGS frame.
    answer, _ = h2_answer(tls_served.address)
    assert len(answer) >= 9 and answer[3] == 4, answer
    # The worker: TLS, with a certificate of the gateway's private CA for 127.0.0.1,
    # but nothing for a client without the gateway's certificate.
    answer, peer = h2_answer(address)
    assert answer == b""
    assert peer is not None
    certificate = x509.load_der_x509_certificate(peer)
    issuer = certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert issuer == "switchyard worker CA"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    # A client certificate of another CA is refused too.
    answer, _ = h2_answer(address, pki.client("intruder"))
    assert answer == b""
    # And plaintext gets no answer at all.
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def test_the_worker_environment_holds_no_secret(tls_served: RunningGateway) -> None:
    gateway_env = _environ(tls_served.process.pid)
    assert gateway_env["SWITCHYARD_ADMIN_TOKEN"] == ADMIN_TOKEN
    assert gateway_env[SECRET_ENV] == "upstream-secret"
    worker_env = _environ(worker_pid(tls_served))
    assert worker_env["SWITCHYARD_PARENT_PID"] == str(tls_served.process.pid)
    assert "SWITCHYARD_ADMIN_TOKEN" not in worker_env
    assert SECRET_ENV not in worker_env
    assert ADMIN_TOKEN not in "\0".join(worker_env.values())


def test_the_worker_key_file_is_gone_once_it_listens(tls_served: RunningGateway) -> None:
    argv = Path(f"/proc/{worker_pid(tls_served)}/cmdline").read_bytes().decode().split("\0")
    key = Path(argv[argv.index("--tls-key") + 1])
    assert "--tls-client-ca" in argv
    assert not key.parent.exists(), f"{key.parent} still holds the worker's key"


def admin(gateway: RunningGateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SWITCHYARD, "admin", "--target", str(gateway.info["admin"]), *args],
        cwd=ROOT,
        env={**os.environ, "SWITCHYARD_ADMIN_TOKEN": ADMIN_TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_admin_cli_over_tls(tls_served: RunningGateway, pki: PKI) -> None:
    run = admin(tls_served, "--tls-ca", str(pki.ca_file), "--json", "backends")
    assert run.returncode == 0, run.stderr
    backends = json.loads(run.stdout)["backends"]
    assert [b["backend"] for b in backends] == ["small"]
    plain = admin(tls_served, "--timeout", "5", "backends")
    assert plain.returncode == 1
    assert "UNAVAILABLE" in plain.stderr


def test_serve_refuses_a_plaintext_admin_api_beyond_loopback(
    repository: Path, tmp_path: Path
) -> None:
    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        repository,
        [{"name": "remote", "address": "127.0.0.1:1"}],
        admin="0.0.0.0:0",
    )
    run = subprocess.run(
        [*SWITCHYARD, "serve", "--config", str(fleet)],
        cwd=ROOT,
        env={**os.environ, "SWITCHYARD_ADMIN_TOKEN": ADMIN_TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "gateway.admin 0.0.0.0:0 is not a loopback address" in run.stderr


def test_load_generator_over_tls(tls_served: RunningGateway, pki: PKI, tmp_path: Path) -> None:
    """`switchyard load --tls-ca` drives a gateway that listens with TLS; without it the
    same run cannot reach the gateway."""
    scenario = tmp_path / "tls.yaml"
    scenario.write_text(
        "scenario: tls\n"
        "duration_s: 2\n"
        "backends:\n"
        "  - {name: small, price_usd_per_hour: 0.04, models: {digits: {p50_ms: 1, p99_ms: 2}}}\n"
        "traffic:\n"
        "  - {model: digits, rate_per_s: 20, arrivals: constant}\n"
        "thresholds:\n"
        "  live: {max_error_fraction: 0}\n"
    )
    command = [
        sys.executable, "-m", "gateway.cli", "load", "--target", tls_served.address,
        "--scenario", str(scenario), "--json", "--quiet",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "SWITCHYARD_ADMIN_TOKEN"}
    run = subprocess.run(
        [*command, "--tls-ca", str(pki.ca_file)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])["summary"]
    assert summary["requests"] == 40 and summary["ok"] == 40, summary
    assert summary["lost"] == 0
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert plain.returncode == 2, plain.stdout + plain.stderr
    assert "UNAVAILABLE" in plain.stdout + plain.stderr
