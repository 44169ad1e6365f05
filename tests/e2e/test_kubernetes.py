"""The Kubernetes manifests (deploy/kubernetes): each kustomization renders with
`kubectl kustomize`, the fleet file it ships is one the gateway accepts, and kubelet's
probes reach the gateway's probe port (gRPC, on the pod's address): readiness on its
health service, liveness on the `liveness` service that stays SERVING whatever the
backends."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_fleet
from gateway.serving.probes import LIVENESS_SERVICE

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))


def render(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomizations cannot be rendered")
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_there_is_a_base_and_an_overlay() -> None:
    names = {str(p.relative_to(KUBERNETES)) for p in KUSTOMIZATIONS}
    assert "base" in names
    assert any(name.startswith("overlays/") for name in names)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_probes_go_to_the_gateway_probe_port(folder: Path, tmp_path: Path) -> None:
    docs = render(folder)
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(config_map["data"]["fleet.yaml"])
    fleet = load_fleet(fleet_file)  # the gateway accepts it
    assert fleet.gateway.probes is not None
    host, port = fleet.gateway.probes.rsplit(":", 1)
    assert host == "0.0.0.0", "kubelet probes the pod's address, not loopback"

    (gateway,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("gateway")
    ]
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[kind]["grpc"]["port"] == int(port), kind
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert container["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    # The fleet file is mounted where the command reads it.
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (fleet_volume,) = [
        name
        for name, v in volumes.items()
        if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]
    ]
    config_arg = container["command"][container["command"].index("--config") + 1]
    assert config_arg == f"{mounted[fleet_volume]}/fleet.yaml"
