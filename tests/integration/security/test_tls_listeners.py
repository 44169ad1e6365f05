"""TLS on a real gateway in process: its inference, admin and metrics listeners with
`gateway.tls` (and client certificates with `client_ca_file`), certificates taken up
from changed files by new connections, TLS channels to a remote backend, the admin
API's refusal of a non-loopback address in plaintext, and the SSLContext an HTTP
listener reuses."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509

from backends.worker.served import WorkerSettings
from backends.worker.server import server_credentials, start_worker
from gateway.config import ConfigError, FleetConfig, ListenerTLS
from gateway.control.admin_client import AdminCallError, AdminClient, tls_security
from gateway.security import (
    ChannelSecurity,
    TLSFileError,
    client_security,
    is_loopback,
    secure_channel,
    ssl_server_context,
)
from gateway.server import Gateway, start_gateway
from protos import admin_pb2 as apb
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, fleet_config, output, raw_request, samples
from tests.integration.security.certs import PKI, Leaf, replace_atomically
from tests.waiting import wait_until

TOKEN = "tls-admin-token"
REFUSED_S = 5.0
"""How long a call that must be refused may wait for a connection."""


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path, "gateway")


def tls_settings(server: Leaf, client_ca: Path | None = None) -> dict[str, str]:
    settings = {"cert_file": str(server.cert_file), "key_file": str(server.key_file)}
    if client_ca is not None:
        settings["client_ca_file"] = str(client_ca)
    return settings


async def start_tls_gateway(
    workers: tuple[Worker, Worker], server: Leaf, client_ca: Path | None = None, **gateway: object
) -> Gateway:
    a, b = workers
    return await start_gateway(
        fleet_config(
            {"cheap": (a.address, 0.04), "dear": (b.address, 0.08)},
            tls=tls_settings(server, client_ca),
            **gateway,
        )
    )


async def server_live(address: str, security: ChannelSecurity | None) -> bool:
    async with secure_channel(address, security) as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            pb.ServerLiveRequest(), timeout=REFUSED_S, wait_for_ready=False
        )
        return bool(reply.live)


async def refused(address: str, security: ChannelSecurity | None) -> grpc.StatusCode:
    """The status a call over `security` ends with, when it must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server_live(address, security)
    return info.value.code()


async def infer_digits(address: str, security: ChannelSecurity | None, repository: Path) -> None:
    inputs, reference = samples(repository, "digits")
    async with secure_channel(address, security) as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            raw_request("digits", inputs, {"input": "FP32"}), timeout=30
        )
    assert (output(reply, "label", np.int64) == reference["label"]).all()


async def peer_serial(address: str) -> int:
    """The serial number of the certificate a new TLS connection to `address` gets."""
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()  # the server's HTTP/2 settings may cross the close
    return x509.load_der_x509_certificate(der).serial_number


async def test_inference_over_tls_and_plaintext_is_refused(
    two_workers: tuple[Worker, Worker], pki: PKI, repository: Path
) -> None:
    gateway = await start_tls_gateway(two_workers, pki.server())
    try:
        security = client_security(pki.ca_file)
        await infer_digits(gateway.address, security, repository)
        assert await refused(gateway.address, None) == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA does not take the gateway's certificate.
        stranger = PKI(pki.directory, "stranger")
        untrusted = client_security(stranger.ca_file)
        assert await refused(gateway.address, untrusted) == grpc.StatusCode.UNAVAILABLE
    finally:
        await gateway.stop()


async def test_mtls_refuses_clients_without_a_certificate_of_the_client_ca(
    two_workers: tuple[Worker, Worker], pki: PKI, repository: Path
) -> None:
    clients = PKI(pki.directory, "clients")
    gateway = await start_tls_gateway(two_workers, pki.server(), client_ca=clients.ca_file)
    try:
        known = clients.client("known")
        security = client_security(pki.ca_file, known.cert_file, known.key_file)
        await infer_digits(gateway.address, security, repository)
        anonymous = client_security(pki.ca_file)
        assert await refused(gateway.address, anonymous) == grpc.StatusCode.UNAVAILABLE
        # A certificate, but signed by a CA the gateway does not take for clients.
        other = pki.client("other")
        foreign = client_security(pki.ca_file, other.cert_file, other.key_file)
        assert await refused(gateway.address, foreign) == grpc.StatusCode.UNAVAILABLE
    finally:
        await gateway.stop()


async def test_new_connections_get_the_replaced_certificate(
    two_workers: tuple[Worker, Worker], pki: PKI, repository: Path
) -> None:
    first = pki.server("listener")
    gateway = await start_tls_gateway(two_workers, first)
    try:
        old_serial = first.serial
        assert await peer_serial(gateway.address) == old_serial
        rotated = pki.server("rotated")
        replace_atomically(first.key_file, rotated.key_file.read_bytes())
        replace_atomically(first.cert_file, rotated.cert_file.read_bytes())
        assert first.serial == rotated.serial != old_serial
        # The first connection after the change already gets the new certificate.
        assert await peer_serial(gateway.address) == rotated.serial
        await infer_digits(gateway.address, client_security(pki.ca_file), repository)
        # A replacement that does not load (a certificate without its key) is not
        # taken: connections keep the last good certificate.
        half = pki.server("half")
        replace_atomically(first.cert_file, half.cert_file.read_bytes())
        assert await peer_serial(gateway.address) == rotated.serial
        replace_atomically(first.key_file, half.key_file.read_bytes())
        assert await peer_serial(gateway.address) == half.serial
    finally:
        await gateway.stop()


async def test_admin_api_over_tls_with_its_token(
    two_workers: tuple[Worker, Worker], pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    gateway = await start_tls_gateway(two_workers, pki.server(), admin="127.0.0.1:0")
    try:
        assert gateway.admin_address is not None
        security = tls_security(pki.ca_file)
        async with AdminClient(gateway.admin_address, TOKEN, 5.0, security) as admin:
            reply = await admin.call("ListBackends", apb.ListBackendsRequest())
        assert sorted(b.backend for b in reply.backends) == ["cheap", "dear"]
        async with AdminClient(gateway.admin_address, "wrong", 5.0, security) as admin:
            with pytest.raises(AdminCallError) as wrong:
                await admin.call("ListBackends", apb.ListBackendsRequest())
        assert wrong.value.code == grpc.StatusCode.UNAUTHENTICATED
        async with AdminClient(gateway.admin_address, TOKEN, REFUSED_S) as plaintext:
            with pytest.raises(AdminCallError) as plain:
                await plaintext.call("ListBackends", apb.ListBackendsRequest())
        assert plain.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await gateway.stop()


async def test_admin_refuses_a_non_loopback_address_without_tls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    config = fleet_config({"remote": ("127.0.0.1:1", 0.1)}, admin="0.0.0.0:0")
    with pytest.raises(ConfigError, match=r"gateway.admin 0.0.0.0:0 is not a loopback address"):
        await start_gateway(config)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:8003", True),
        ("127.8.0.1:8003", True),
        ("localhost:8003", True),
        ("[::1]:8003", True),
        ("0.0.0.0:8003", False),
        ("[::]:8003", False),
        ("10.0.0.5:8003", False),
        ("admin.example:8003", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


async def test_certificate_files_that_do_not_load_stop_the_start(
    two_workers: tuple[Worker, Worker], pki: PKI
) -> None:
    good = pki.server("good")
    other = pki.server("other")
    mismatched = Leaf(good.cert_file, other.key_file)
    with pytest.raises(TLSFileError, match="does not hold the key of the certificate"):
        await start_tls_gateway(two_workers, mismatched)
    missing = Leaf(pki.directory / "absent.crt", good.key_file)
    with pytest.raises(TLSFileError, match=r"cannot read the certificate file .*absent\.crt"):
        await start_tls_gateway(two_workers, missing)


async def test_metrics_over_tls(two_workers: tuple[Worker, Worker], pki: PKI) -> None:
    first = pki.server()
    gateway = await start_tls_gateway(two_workers, first, metrics_tls=True)
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_file))

        def get(scheme: str) -> str:
            url = f"{scheme}://127.0.0.1:{gateway.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=REFUSED_S, context=context) as reply:
                return str(reply.read().decode())

        assert "switchyard_backend_healthy" in await asyncio.to_thread(get, "https")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            await asyncio.to_thread(get, "http")
        # Its certificate is read again after the files change, as the gRPC listeners' is.
        metrics = f"127.0.0.1:{gateway.metrics_port}"
        assert await peer_serial(metrics) == first.serial
        rotated = pki.server("rotated-metrics")
        replace_atomically(first.key_file, rotated.key_file.read_bytes())
        replace_atomically(first.cert_file, rotated.cert_file.read_bytes())
        assert await peer_serial(metrics) == rotated.serial
        assert "switchyard_backend_healthy" in await asyncio.to_thread(get, "https")
    finally:
        await gateway.stop()


@pytest.fixture
async def tls_backend(repository: Path, pki: PKI) -> AsyncIterator[tuple[Worker, PKI]]:
    """A worker over mTLS whose certificate names only `backend.internal`, taking
    client certificates of its own CA."""
    own = PKI(pki.directory, "backend")
    leaf = own.server("backend", hosts=("backend.internal",))
    credentials = server_credentials(leaf.cert_file, leaf.key_file, own.ca_file)
    server, port, models, executor, _ = await start_worker(
        WorkerSettings(repository=repository, threads=1, hardware_class="test-1c"),
        "127.0.0.1:0",
        credentials,
    )
    worker = Worker(f"127.0.0.1:{port}", server, models, executor)
    yield worker, own
    await worker.stop()


def remote_fleet(address: str, tls: dict[str, str] | None) -> FleetConfig:
    backend: dict[str, object] = {"name": "remote", "address": address}
    if tls is not None:
        backend["tls"] = tls
    return FleetConfig.model_validate(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "metrics": "127.0.0.1:0",
                "http": "127.0.0.1:0",
                "probe_interval_s": 0.2,
            },
            "backends": [backend],
        }
    )


async def test_remote_backend_over_mtls(tls_backend: tuple[Worker, PKI], repository: Path) -> None:
    worker, own = tls_backend
    client = own.client("gateway-client")
    tls = {
        "ca_file": str(own.ca_file),
        "cert_file": str(client.cert_file),
        "key_file": str(client.key_file),
        "server_name": "backend.internal",
    }
    gateway = await start_gateway(remote_fleet(worker.address, tls))
    try:
        remote = gateway.fleet.backends["remote"]
        await wait_until(lambda: remote.healthy, what="the remote backend probed ready over mTLS")
        await infer_digits(gateway.address, None, repository)
    finally:
        await gateway.stop()
    # Without the client certificate, or in plaintext, the backend is out of reach.
    without_cert = {"ca_file": str(own.ca_file), "server_name": "backend.internal"}
    for settings in (without_cert, None):
        gateway = await start_gateway(remote_fleet(worker.address, settings))
        try:
            remote = gateway.fleet.backends["remote"]
            assert not remote.healthy and remote.last_error, settings
            print(f"probe over {settings}: {remote.last_error}")
        finally:
            await gateway.stop()


async def test_ssl_context_for_http_listeners(pki: PKI) -> None:
    """The SSLContext a REST listener reuses: client certificates required with
    `client_ca_file`, the certificate taken up from changed files."""
    clients = PKI(pki.directory, "clients")
    first = pki.server("http")
    context = ssl_server_context(ListenerTLS.model_validate(tls_settings(first, clients.ca_file)))

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    known = clients.client("known")

    async def exchange(with_certificate: bool) -> tuple[bytes, int]:
        client = ssl.create_default_context(cafile=str(pki.ca_file))
        if with_certificate:
            client.load_cert_chain(known.cert_file, known.key_file)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.write(b"ping\n")
            await writer.drain()
            return await reader.readline(), x509.load_der_x509_certificate(der).serial_number
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()

    try:
        assert await exchange(True) == (b"ping\n", first.serial)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            line, _ = await exchange(False)
            if not line:  # TLS 1.3: the refusal arrives after the client's handshake
                raise ConnectionError("closed by the server")
        old_serial = first.serial
        rotated = pki.server("rotated")
        replace_atomically(first.key_file, rotated.key_file.read_bytes())
        replace_atomically(first.cert_file, rotated.cert_file.read_bytes())
        assert await exchange(True) == (b"ping\n", rotated.serial)
        assert rotated.serial != old_serial
    finally:
        server.close()
        await server.wait_closed()
