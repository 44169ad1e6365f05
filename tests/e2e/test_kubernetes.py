"""The Kubernetes manifests (deploy/kubernetes): each kustomization renders with
`kubectl kustomize` and every object it renders validates against the Kubernetes API
schema of KUBERNETES_VERSION (kubernetes-validate, strict: an unknown field is an
error); the ServiceMonitor and the PrometheusRule, Prometheus Operator CRDs outside that
schema, are checked structurally here (the PrometheusRule holds deploy/prometheus/rules.yaml's
groups as rendered, which promtool checks, and is in step with its generator). Then what the rendered objects must say: kubelet's probes reach the
gateway's probe port (gRPC, on the pod's address: readiness on its health service,
liveness on the `liveness` service that stays SERVING whatever the backends); every
container has requests and limits, runs as non-root on a read-only root filesystem and
writes only to emptyDirs; images carry the project's version as their tag; only gateways
reach the workers; the autoscaler and disruption budget hold the gateways; each fleet
file is one the gateway accepts, and its discovery groups name the headless Services of
the worker pools rendered beside it, with their hardware classes; the commands the
containers run parse with the real command-line parsers."""

from __future__ import annotations

import argparse
import base64
import functools
import importlib.util
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from backends.compile.tvm.targets import CPU_TARGETS
from backends.worker import server as worker_cli
from gateway import server as gateway_cli
from gateway.config import FleetConfig, load_fleet
from gateway.serving.probes import LIVENESS_SERVICE

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))
# What is applied: the base and the overlays (the pools are parts the overlays take).
DEPLOYABLE = [p for p in KUSTOMIZATIONS if p.parent.name != "pools"]
OVERLAYS = [p for p in KUSTOMIZATIONS if p.parent.name == "overlays"]
KUBERNETES_VERSION = "1.30.0"
"""The API version the rendered objects are validated against (gRPC probes are GA
since 1.27, autoscaling/v2 since 1.23, policy/v1 since 1.21)."""
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
WORKER_PORT = 9101
NFD_CPUID = "feature.node.kubernetes.io/cpu-cpuid."
"""node-feature-discovery's label prefix for a CPUID flag (value "true")."""

Doc = dict[str, Any]


def name_of(path: Path) -> str:
    return str(path.relative_to(KUBERNETES))


@functools.cache
def _rendered_text(folder: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed (make test installs Debian's kubernetes-client as "
            "root): the kustomizations cannot be rendered"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(folder: Path) -> list[Doc]:
    """The objects `kubectl kustomize folder` renders (parsed afresh on each call)."""
    return [doc for doc in yaml.safe_load_all(_rendered_text(folder)) if doc]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only, as these manifests use) matches."""
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def gateway_deployment(docs: list[Doc]) -> Doc:
    return one(docs, "Deployment", "switchyard-gateway")


def worker_deployments(docs: list[Doc]) -> list[Doc]:
    return [
        d for d in workloads(docs) if pod_labels(d).get("app.kubernetes.io/component") == "backend"
    ]


def fleet_of(docs: list[Doc], tmp_path: Path) -> tuple[Doc, FleetConfig]:
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(config_map["data"]["fleet.yaml"])
    return config_map, load_fleet(fleet_file)  # the gateway accepts it


def mounts(workload: Doc, container: Doc) -> dict[str, Doc]:
    """Each mount path of `container` with the pod volume mounted there."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def volume_holding(workload: Doc, container: Doc, path: Path) -> Doc:
    """The volume that the file at `path` lives on in `container`."""
    for mount_path, volume in mounts(workload, container).items():
        if path.is_relative_to(mount_path):
            return volume
    raise AssertionError(f"{path} is on no mounted volume (the root filesystem is read-only)")


def parse(add_arguments: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(argv)


def test_there_is_a_base_and_the_dev_and_prod_overlays() -> None:
    names = {name_of(p) for p in KUSTOMIZATIONS}
    assert {"base", "overlays/dev", "overlays/prod"} <= names
    assert {"pools/avx512", "pools/gpu", "pools/cpu"} <= names


def check_service_monitor(monitor: Doc, docs: list[Doc]) -> None:
    """A ServiceMonitor (monitoring.coreos.com/v1, not in the Kubernetes schema): it
    selects the gateway Service by its labels, in its own namespace, and scrapes a port
    that Service names, at /metrics."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, spec
    services = [
        d
        for d in docs
        if d["kind"] == "Service" and selects(spec["selector"], d["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == ["switchyard-gateway"]
    (service,) = services
    assert "namespaceSelector" not in spec
    assert monitor["metadata"].get("namespace") == service["metadata"].get("namespace")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert spec["endpoints"], "no endpoint to scrape"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"


RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"


def check_prometheus_rule(rule: Doc, docs: list[Doc]) -> None:
    """A PrometheusRule (monitoring.coreos.com/v1): rules.yaml's groups, whole, beside the
    gateway Service it is about, with that Service's labels (the ServiceMonitor's too)."""
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    service = one(docs, "Service", "switchyard-gateway")
    assert rule["metadata"].get("namespace") == service["metadata"].get("namespace")
    assert rule["metadata"]["labels"] == service["metadata"]["labels"]
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"], group.get("name")
        for entry in group["rules"]:
            assert ("record" in entry) != ("alert" in entry), entry
            assert isinstance(entry["expr"], str) and entry["expr"].strip()


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=name_of)
def test_every_rendered_object_validates(folder: Path) -> None:
    docs = render(folder)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["kind"] in ("ServiceMonitor", "PrometheusRule"), doc["kind"]
            if doc["kind"] == "ServiceMonitor":
                check_service_monitor(doc, docs)
            else:
                check_prometheus_rule(doc, docs)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


@pytest.mark.parametrize("folder", DEPLOYABLE, ids=name_of)
def test_probes_go_to_the_gateway_probe_port(folder: Path, tmp_path: Path) -> None:
    docs = render(folder)
    config_map, fleet = fleet_of(docs, tmp_path)
    assert fleet.gateway.probes is not None
    host, port = fleet.gateway.probes.rsplit(":", 1)
    assert host == "0.0.0.0", "kubelet probes the pod's address, not loopback"

    gateway = gateway_deployment(docs)
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
    # The command is `switchyard serve` with arguments it takes.
    assert container["command"][:2] == ["switchyard", "serve"]
    parse(gateway_cli.add_arguments, container["command"][2:])
    # The Service carries the three client ports to the pod's named ports.
    service = one(docs, "Service", "switchyard-gateway")
    ports = {p["name"]: p for p in container["ports"]}
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}
    for service_port in service["spec"]["ports"]:
        assert ports[service_port["targetPort"]]["containerPort"] == service_port["port"]
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(gateway))
    listening = {
        fleet.gateway.listen: "grpc",
        fleet.gateway.http: "http",
        fleet.gateway.metrics: "metrics",
    }
    for address, port_name in listening.items():
        assert address == f"0.0.0.0:{ports[port_name]['containerPort']}", port_name


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=name_of)
def test_containers_are_bounded_non_root_and_read_only(folder: Path) -> None:
    for workload in workloads(render(folder)):
        pod = workload["spec"]["template"]["spec"]
        where = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        assert pod.get("automountServiceAccountToken") is False, where
        for container in pod.get("initContainers", []) + pod["containers"]:
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[bound]), (where, bound)
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            # What it may write is an emptyDir; everything else is mounted read-only.
            for path, volume in mounts(workload, container).items():
                (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
                if not mount.get("readOnly", False):
                    assert "emptyDir" in volume, (where, path)
            if "redis" not in container["image"]:
                assert "emptyDir" in volume_holding(workload, container, Path("/tmp")), where


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=name_of)
def test_images_carry_pinned_tags(folder: Path) -> None:
    for workload in workloads(render(folder)):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag, f"{image}: no tag"
            assert tag != "latest", image
            assert tag[0].isdigit(), f"{image}: a version, not a moving name"
            if name.endswith(
                ("switchyard-gateway", "switchyard-backend", "switchyard-backend-gpu")
            ):
                assert tag == VERSION, f"{image}: the project is {VERSION}"


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=name_of)
def test_only_gateways_reach_the_workers(folder: Path) -> None:
    docs = render(folder)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    gateway_labels = {
        "app.kubernetes.io/name": "switchyard-gateway",
        "app.kubernetes.io/component": "gateway",
        "app.kubernetes.io/part-of": "switchyard",
    }
    if any(
        d["kind"] == "Deployment" and d["metadata"]["name"] == "switchyard-gateway" for d in docs
    ):
        gateway_labels = pod_labels(gateway_deployment(docs))
    workers = worker_deployments(docs)
    if folder.parent.name == "pools":
        assert workers and not policies, "the policy lives in the base, beside the gateways"
        return
    backend_policies = [p for p in policies if p["metadata"]["name"] == "switchyard-backend"]
    assert backend_policies, "no NetworkPolicy for the workers"
    (policy,) = backend_policies
    spec = policy["spec"]
    assert not selects(spec["podSelector"], gateway_labels)
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}, "pods of this namespace only"
    assert selects(source["podSelector"], gateway_labels)
    assert rule["ports"] == [{"protocol": "TCP", "port": WORKER_PORT}]
    for worker in workers:
        labels = pod_labels(worker)
        assert selects(spec["podSelector"], labels), worker["metadata"]["name"]
        assert not selects(source["podSelector"], labels)
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        assert [p["containerPort"] for p in container["ports"]] == [WORKER_PORT]
    if folder.name == "prod":
        redis = one(docs, "NetworkPolicy", "switchyard-redis")
        (rule,) = redis["spec"]["ingress"]
        (source,) = rule["from"]
        assert selects(source["podSelector"], gateway_labels)
        assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


@pytest.mark.parametrize("folder", DEPLOYABLE, ids=name_of)
def test_the_autoscaler_and_disruption_budget_hold_the_gateways(folder: Path) -> None:
    docs = render(folder)
    gateway = gateway_deployment(docs)
    hpa = one(docs, "HorizontalPodAutoscaler", "switchyard-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "switchyard-gateway",
    }
    replicas = gateway["spec"]["replicas"]
    assert hpa["spec"]["minReplicas"] <= replicas <= hpa["spec"]["maxReplicas"]
    pdb = one(docs, "PodDisruptionBudget", "switchyard-gateway")
    assert selects(pdb["spec"]["selector"], pod_labels(gateway))
    if folder.name == "dev":
        assert replicas == 1 and hpa["spec"]["maxReplicas"] == 1
        # One gateway: a budget that kept it would stop every node drain.
        assert "minAvailable" not in pdb["spec"] and pdb["spec"]["maxUnavailable"] == 1
        return
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    if folder.name == "prod":
        assert replicas == 3 and hpa["spec"]["minReplicas"] == 3
        assert pdb["spec"]["minAvailable"] == 2


@pytest.mark.parametrize("folder", OVERLAYS, ids=name_of)
def test_fleet_groups_are_the_pools_headless_services(folder: Path, tmp_path: Path) -> None:
    docs = render(folder)
    _, fleet = fleet_of(docs, tmp_path)
    namespace = gateway_deployment(docs)["metadata"]["namespace"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    pools = {d["metadata"]["name"]: d for d in worker_deployments(docs)}
    named = set()
    for group in fleet.backends:
        assert group.discovery is not None, f"{group.name}: a pool is found through DNS"
        service_name, _, domain = group.discovery.dns.partition(".")
        assert domain == f"{namespace}.svc.cluster.local", group.discovery.dns
        service = services[service_name]
        assert service["spec"]["clusterIP"] == "None", "headless: one record per pod"
        (port,) = service["spec"]["ports"]
        assert port["port"] == group.discovery.port
        (pool,) = [
            p
            for p in pools.values()
            if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(p))
        ]
        named.add(pool["metadata"]["name"])
        (container,) = pool["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["grpc"]["port"] == group.discovery.port
        args = parse(worker_cli.add_arguments, container["args"])
        assert args.listen == f"0.0.0.0:{group.discovery.port}"
        assert args.hardware_class == group.hardware_class
        assert group.slots == args.threads
        assert container["resources"]["limits"]["cpu"] == str(args.threads)
        assert volume_holding(pool, container, args.repository)["persistentVolumeClaim"]
    assert named == set(pools), "every pool rendered is a group of the fleet"


def test_dev_is_one_gateway_over_cpu_workers(tmp_path: Path) -> None:
    docs = render(KUBERNETES / "overlays" / "dev")
    _, fleet = fleet_of(docs, tmp_path)
    assert [b.hardware_class for b in fleet.backends] == ["cpu"]
    (pool,) = worker_deployments(docs)
    pod = pool["spec"]["template"]["spec"]
    assert "affinity" not in pod and "tolerations" not in pod, "any node runs it"
    assert fleet.gateway.state is None and fleet.gateway.tls is None
    gateway = gateway_deployment(docs)
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert fleet.gateway.state_file is not None
    assert "emptyDir" in volume_holding(gateway, container, fleet.gateway.state_file)
    # The admin token is a Secret generated from the committed placeholder.
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert "not-a-secret" in token
    assert fleet.gateway.admin_token_file is not None
    volume = volume_holding(gateway, container, fleet.gateway.admin_token_file)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]


def test_prod_shares_state_through_its_redis(tmp_path: Path) -> None:
    docs = render(KUBERNETES / "overlays" / "prod")
    _, fleet = fleet_of(docs, tmp_path)
    assert fleet.gateway.state is not None and fleet.gateway.state.startswith("redis://")
    host_port = fleet.gateway.state.removeprefix("redis://").split("/")[0]
    host, port = host_port.rsplit(":", 1)
    service_name, _, domain = host.partition(".")
    assert domain == "switchyard.svc.cluster.local"
    service = one(docs, "Service", service_name)
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    redis = one(docs, "Deployment", "switchyard-redis")
    assert redis["spec"]["replicas"] == 1
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(redis))
    # The Secrets are made by hand, never rendered from files in the repository; the
    # gateways mount them (TLS required here: the fleet names its files).
    assert not [d for d in docs if d["kind"] == "Secret"]
    gateway = gateway_deployment(docs)
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert fleet.gateway.tls is not None and fleet.gateway.admin_token_file is not None
    tls = volume_holding(gateway, container, fleet.gateway.tls.cert_file)["secret"]
    assert tls == volume_holding(gateway, container, fleet.gateway.tls.key_file)["secret"]
    assert tls["secretName"] == "switchyard-gateway-tls" and tls["optional"] is False
    admin = volume_holding(gateway, container, fleet.gateway.admin_token_file)["secret"]
    assert admin["secretName"] == "switchyard-admin" and not admin.get("optional", False)


def test_prod_pools_land_on_their_hardware() -> None:
    docs = render(KUBERNETES / "overlays" / "prod")
    gpu = one(docs, "Deployment", "switchyard-backend-gpu")
    pod = gpu["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for bound in ("requests", "limits"):
        assert container["resources"][bound]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert parse(worker_cli.add_arguments, container["args"]).hardware_class.startswith("gpu-")
    # The GPU image (deploy/backend.Dockerfile --build-arg RUNTIME=cuda), which runs the
    # class's CUDA variants; the CPU pools keep the CPU image.
    assert container["image"] == f"switchyard-backend-gpu:{VERSION}"
    (pool_gpu,) = worker_deployments(render(KUBERNETES / "pools" / "gpu"))
    assert pool_gpu["spec"]["template"]["spec"]["containers"][0]["image"] == container["image"]

    avx512 = one(docs, "Deployment", "switchyard-backend-avx512")
    pod = avx512["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    required = {
        e["key"].removeprefix(NFD_CPUID).lower()
        for e in term["matchExpressions"]
        if e["key"].startswith(NFD_CPUID) and e["operator"] == "In" and e["values"] == ["true"]
    }
    assert "avx512f" in required
    # Every AVX-512 flag the pool's variants need (tvm-llvm-avx512: x86-64-v4).
    needed = {f for f in CPU_TARGETS["llvm-avx512"].required_cpu_flags if f.startswith("avx512")}
    assert needed <= required, needed - required
    (container,) = pod["containers"]
    assert parse(worker_cli.add_arguments, container["args"]).hardware_class.startswith(
        "cpu-x86-64-v4-"
    )
    assert container["image"] == f"switchyard-backend:{VERSION}"


def test_no_private_key_is_committed() -> None:
    for path in KUBERNETES.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY" not in path.read_text(errors="replace"), path


def generator() -> Any:
    """deploy/prometheus/prometheusrule.py, the PrometheusRule's generator, as a module."""
    path = ROOT / "deploy" / "prometheus" / "prometheusrule.py"
    spec = importlib.util.spec_from_file_location("prometheusrule", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_prometheus_rule_is_in_step_with_rules_yaml(tmp_path: Path) -> None:
    module = generator()
    committed = (KUBERNETES / "base" / "prometheusrule.yaml").read_text()
    assert committed == module.manifest(RULES.read_text()), (
        "deploy/kubernetes/base/prometheusrule.yaml is out of step with rules.yaml: run "
        "python deploy/prometheus/prometheusrule.py"
    )
    assert module.main(["--check"]) == 0
    # An edit of the rules shows: the check fails until the manifest is written again.
    edited = RULES.read_text().replace("rate5m", "rate6m", 1)
    assert module.manifest(edited) != committed
    with pytest.raises(ValueError, match="groups"):
        module.manifest("rules: []")
    # Every base-derived kustomization carries it once.
    for folder in DEPLOYABLE:
        rules = [d for d in render(folder) if d["kind"] == "PrometheusRule"]
        assert len(rules) == 1, name_of(folder)


def test_promtool_checks_the_rendered_rules(tmp_path: Path) -> None:
    """The rules as kustomize renders them (block text and all) are what Prometheus loads."""
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = (
            "promtool is not installed (Debian: apt-get install --no-install-recommends "
            "prometheus, which `make test` runs as root)"
        )
        print(f"skipped: {reason}")
        pytest.skip(reason)
    rule = one(render(KUBERNETES / "overlays" / "prod"), "PrometheusRule", "switchyard-gateway")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
