"""`switchyard serve` as users run it: real gateway and worker processes, the
reference client, perf_analyzer, and a worker killed under load."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import (
    ADMIN_TOKEN,
    ROOT,
    SWITCHYARD,
    RunningGateway,
    perf_analyzer_throughput,
)
from tests.waiting import wait_until_blocking

HERE = Path(__file__).resolve().parent


def run_client(address: str, repository: Path) -> dict:  # type: ignore[type-arg]
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_client_check.py"), address, str(repository)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_reference_client_sees_a_complete_server(served: RunningGateway, repository: Path) -> None:
    seen = run_client(served.address, repository)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert not seen["unknown_model_ready"]
    assert seen["server_metadata"]["name"] == "switchyard"
    assert seen["model_metadata"]["inputs"][0] == {
        "name": "input",
        "datatype": "FP32",
        "shape": ["-1", "64"],
    }
    assert seen["model_config"]["config"]["maxBatchSize"] == 64
    assert {m["name"] for m in seen["index"]["models"]} >= {"digits", "cnn", "echo"}
    for mode in ("raw", "typed"):
        result = seen[f"infer_{mode}"]
        assert result["id"] == f"req-{mode}"
        assert result["labels_match"], result
        assert result["outputs"] == ["label"]
        assert result["parameters"]["switchyard_backend"] in {"small", "big"}
        assert result["parameters"]["switchyard_variant"] == "ort-cpu-fp32"
    assert seen["bad"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'input'" in seen["bad"]["message"]
    assert int(seen["statistics"]["modelStats"][0]["inferenceStats"]["success"]["count"]) >= 2


def test_launched_workers_run_with_their_cpus_and_threads(served: RunningGateway) -> None:
    status = Path(f"/proc/{served.info['pids']['small']}/status").read_text()
    allowed = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    assert allowed.split(":")[1].strip() == "0"
    environ = Path(f"/proc/{served.info['pids']['big']}/environ").read_bytes().split(b"\0")
    assert b"TVM_NUM_THREADS=2" in environ and b"TVM_USE_RUNTIME_LIB=1" in environ


def test_perf_analyzer_drives_the_gateway(served: RunningGateway, tmp_path: Path) -> None:
    assert perf_analyzer_throughput("grpc", served.address, "digits", tmp_path) > 0


def test_a_killed_worker_is_ejected_restarted_readmitted_and_costs_no_request(
    served: RunningGateway, repository: Path
) -> None:
    import grpc
    import numpy as np

    from protos import admin_pb2 as apb
    from protos import admin_pb2_grpc
    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(served.address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    admin_channel = grpc.insecure_channel(served.info["admin"])
    admin = admin_pb2_grpc.AdminStub(admin_channel)
    auth = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
    failures: list[str] = []
    used: list[tuple[float, str]] = []  # (answered at, backend)
    seen: list[tuple[float, str, bool]] = []  # (time, status, listening) of "small"
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                reply = stub.ModelInfer(req, timeout=10)
                used.append((time.monotonic(), reply.parameters["switchyard_backend"].string_param))
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    def watch() -> None:
        while not stop.is_set():
            try:
                reply = admin.ListRoutes(
                    apb.ListRoutesRequest(model="digits"), metadata=auth, timeout=5
                )
            except grpc.RpcError as exc:
                failures.append(f"admin: {exc.code()}: {exc.details()}")
                return
            for r in reply.routes:
                if r.backend == "small" and r.default_variant:
                    host, port = r.address.rsplit(":", 1)
                    try:
                        socket.create_connection((host, int(port)), timeout=0.2).close()
                        listening = True
                    except OSError:
                        listening = False
                    seen.append((time.monotonic(), r.status, listening))
            time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(4)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()

    def restarted() -> bool:
        """Back: the watcher saw it down, then ready and listening, and a request was
        answered there since."""
        down = [t for t, _, up in seen if t > killed_at and not up]
        back = [t for t, status, up in seen if down and t > down[0] and status == "ready" and up]
        return bool(back) and any(t > back[0] and b == "small" for t, b in used)

    killed_at = 0.0
    try:
        wait_until_blocking(
            lambda: (
                (len(used) >= 8 and any(s == "ready" and up for _, s, up in seen)) or bool(failures)
            ),
            what="requests answered and the watcher seeing small ready",
        )
        killed_at = time.monotonic()
        os.kill(served.info["pids"]["small"], signal.SIGKILL)
        try:
            wait_until_blocking(
                lambda: restarted() or bool(failures),
                timeout_s=40.0,
                what="small to be restarted, ready again and used",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{served.log()[-3000:]}") from None
    finally:
        stop.set()
        for t in threads:
            t.join()
        channel.close()
        admin_channel.close()
    assert failures == []
    assert restarted()
    assert "worker exited" in served.log()
    timeline = [(round(t - killed_at, 3), status, listening) for t, status, listening in seen]

    def first(after: float, match: Callable[[str, bool], bool], what: str) -> float:
        for t, status, listening in seen:
            if t > after and match(status, listening):
                return t
        raise AssertionError(f"never {what} (seconds after the kill: {timeline})")

    # Out of the routes within 1 s of the kill...
    out_at = first(killed_at, lambda status, _: status != "ready", "out of the routes")
    assert out_at - killed_at <= 1.0, timeline
    # ...and back within 5 s of the restarted worker accepting connections.
    down_at = first(killed_at, lambda _, listening: not listening, "down")
    back_at = first(down_at, lambda _, listening: listening, "listening again")
    ready_at = first(back_at - 1e-9, lambda status, _: status == "ready", "ready again")
    assert ready_at - back_at <= 5.0, timeline
    assert down_at - killed_at <= 1.0, timeline


def test_invalid_fleet_file_fails_with_a_clear_message(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("backends:\n  - name: a\n    address: 127.0.0.1:1\n    pricee: 3\n")
    proc = subprocess.run(
        [*SWITCHYARD, "serve", "--config", str(fleet)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "pricee" in proc.stderr and "Extra inputs are not permitted" in proc.stderr


def test_admin_cli_controls_the_running_gateway(served: RunningGateway, tmp_path: Path) -> None:
    routes = served.admin("--json", "routes", "--model", "digits")
    assert routes.returncode == 0, routes.stderr
    listed = json.loads(routes.stdout)["routes"]
    assert {r["backend"] for r in listed} == {"small", "big"}
    assert all(r["status"] == "ready" for r in listed)
    table = served.admin("routes")
    assert table.returncode == 0 and "small" in table.stdout and "pred p99" in table.stdout

    price = served.admin("set-price", "small", "9.5")
    assert price.returncode == 0 and "small: ready, $9.5000/h" in price.stdout
    why = served.admin("--json", "explain", "digits", "--sla-ms", "50")
    assert why.returncode == 0, why.stderr
    explained = json.loads(why.stdout)
    assert explained["chosen_backend"] == "big" and explained["reason"] == "cheapest-feasible"
    assert served.admin("set-price", "small", "0.04").returncode == 0

    drained = served.admin("drain", "big")
    assert drained.returncode == 0 and "big: drained" in drained.stdout
    assert served.admin("undrain", "big").returncode == 0

    policy = tmp_path / "policies.yaml"
    policy.write_text("default: {latency_ms: 80}\nclasses:\n  gold: {latency_ms: 5}\n")
    set_policy = served.admin("policy", "--set", str(policy))
    assert set_policy.returncode == 0 and "latency_ms: 5" in set_policy.stdout
    assert "latency_ms: 80" in served.admin("policy").stdout

    unknown = served.admin("drain", "nope")
    assert unknown.returncode == 1 and "NOT_FOUND: unknown backend 'nope'" in unknown.stderr

    def admin_without_token(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "SWITCHYARD_ADMIN_TOKEN"}
        return subprocess.run(
            [*SWITCHYARD, "admin", "--target", str(served.info["admin"]), *args],
            cwd=cwd,
            env={**env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=30,
        )

    # No token at all (the embedded demo fleet's token file is relative to where the
    # CLI runs, and there is none there): refused before any call.
    no_token = admin_without_token(tmp_path, "routes")
    assert no_token.returncode == 2, no_token.stderr
    assert "no admin token: set SWITCHYARD_ADMIN_TOKEN" in no_token.stderr
    # A token the gateway does not use: the gateway refuses it.
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-gateway-token\n")
    refused = admin_without_token(tmp_path, "--token-file", str(wrong), "routes")
    assert refused.returncode == 1, refused.stderr
    assert "switchyard admin: UNAUTHENTICATED" in refused.stderr


def test_workers_end_when_the_gateway_is_killed(repository: Path, tmp_path: Path) -> None:
    # kill -9 of the gateway runs none of its shutdown: the workers it launched must
    # still go (the kernel's parent-death signal, which each worker arms itself).
    from tests.e2e.conftest import _alive, start_serve, write_fleet

    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        repository,
        [
            {
                "name": "only",
                "address": "127.0.0.1:0",
                "price_usd_per_hour": 0.04,
                "launch": {"threads": 1, "models": ["digits"]},
            }
        ],
    )
    gateway = start_serve(fleet, tmp_path)
    pids = list(gateway.info["pids"].values())
    assert pids and all(_alive(pid) for pid in pids)
    gateway.process.send_signal(signal.SIGKILL)
    gateway.process.wait(timeout=10)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), f"workers {pids} outlived the gateway"
