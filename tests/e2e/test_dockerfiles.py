"""The images' Dockerfiles (deploy/gateway.Dockerfile, deploy/backend.Dockerfile), read
without a container runtime: what they COPY exists in the build context, the packages
they install are the project's (with extras it declares), the commands they RUN are real
(the runtime-only install is run against an empty site-packages), the base images carry
pinned tags, the user is the non-root number the Kubernetes manifests run as, and the
entry point with its default arguments parses with the real command-line parser. The
backend image's RUNTIME build argument picks its stages (cpu, or cuda for the GPU image):
each value names stages that exist, and the cuda stages install the `cuda` extra and point
TVM at the CUDA files that extra's wheels carry."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.runtimes import install
from backends.worker import server as worker_cli
from gateway import server as gateway_cli

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = {
    "gateway": ROOT / "deploy" / "gateway.Dockerfile",
    "backend": ROOT / "deploy" / "backend.Dockerfile",
}
SUBCOMMANDS: dict[str, Any] = {
    "serve": gateway_cli.add_arguments,
    "backend": worker_cli.add_arguments,
}
"""The `switchyard` subcommand each image's entry point runs, with its parser."""
MANIFESTS = {
    "gateway": ROOT / "deploy" / "kubernetes" / "base" / "gateway.yaml",
    "backend": ROOT / "deploy" / "kubernetes" / "pools" / "avx512" / "backend.yaml",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continued lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: ends inside a continued line"
    return out


def of(path: Path, keyword: str) -> list[str]:
    return [rest for k, rest in instructions(path) if k == keyword]


RUNTIMES = ("cpu", "cuda")
"""The values of the backend image's RUNTIME build argument (`--build-arg RUNTIME=cuda`)."""


def build_args(path: Path) -> dict[str, str]:
    """Each ARG with its default ("" when it has none)."""
    out = {}
    for line in of(path, "ARG"):
        name, _, default = line.partition("=")
        out[name] = default
    return out


def expansions(text: str, args: dict[str, str]) -> list[str]:
    """`text` with ${RUNTIME} as each of its values (`text` alone when it names none)."""
    if "RUNTIME" not in args or "${RUNTIME}" not in text:
        return [text]
    return [text.replace("${RUNTIME}", value) for value in RUNTIMES]


def stage_of(path: Path, name: str) -> list[tuple[str, str]]:
    """The instructions of the stage called `name` (`FROM ... AS name` up to the next FROM)."""
    out: list[tuple[str, str]] = []
    inside = False
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            words = rest.split()
            inside = len(words) == 3 and words[2] == name
        elif inside:
            out.append((keyword, rest))
    assert inside or out, f"{path}: no stage {name}"
    return out


def parse(add_arguments: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_base_images_are_pinned_to_the_project_python(image: str) -> None:
    python = PYPROJECT["project"]["requires-python"]  # ">=3.11,<3.12"
    minor = python.split(",")[0].removeprefix(">=")
    stages: set[str] = set()
    args = build_args(DOCKERFILES[image])
    for line in of(DOCKERFILES[image], "FROM"):
        words = line.split()
        for base in expansions(words[0], args):
            if base not in stages:
                assert "$" not in base, f"{base}: not a stage above it"
                name, _, tag = base.partition(":")
                assert name == "python", base
                assert tag.startswith(f"{minor}.") and tag != "latest", (
                    f"{base}: pin a patch release"
                )
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_what_is_copied_exists_in_the_build_context(image: str) -> None:
    copies = of(DOCKERFILES[image], "COPY")
    assert copies
    for line in copies:
        words = line.split()
        if words[0].startswith("--from="):
            continue
        *sources, _destination = words
        for source in sources:
            assert (ROOT / source).exists(), f"{image}: COPY {source}: not in the repository"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_commands_run_are_real(image: str, tmp_path: Path) -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    installed: list[str] = []
    for line in of(DOCKERFILES[image], "RUN"):
        for command in line.split("&&"):
            argv = shlex.split(command)
            program = Path(argv[0]).name
            if argv[1:3] == ["-m", "venv"]:
                assert program == "python"
            elif program == "pip" and argv[1] == "install":
                (spec,) = [a for a in argv[2:] if not a.startswith("-")]
                path, _, extra = spec.partition("[")
                assert path == "."
                for name in filter(None, extra.rstrip("]").split(",")):
                    assert name in extras, f"{image}: no extra {name!r} in pyproject.toml"
                installed.append(spec)
            elif program == "python" and argv[1] == "-m":
                module = argv[2]
                assert importlib.util.find_spec(module) is not None, module
                assert module == "backends.runtimes.install", f"{image}: unchecked {module}"
                # Its arguments parse, and it runs (nothing to remove in an empty folder).
                assert install.main([*argv[3:], "--site-packages", str(tmp_path)]) == 0
            else:
                pytest.fail(f"{image}: a command this test does not know: {command.strip()}")
    assert installed, f"{image}: installs nothing"
    if image == "gateway":
        # The gateway image runs no variant: no extra, so no TVM.
        assert installed == ["."]
        assert not any("tvm" in d for d in PYPROJECT["project"]["dependencies"])


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_user_is_the_manifests_non_root_number(image: str) -> None:
    (user,) = of(DOCKERFILES[image], "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "runAsNonRoot needs a numeric user"
    docs = [d for d in yaml.safe_load_all(MANIFESTS[image].read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsUser"] == int(uid) and context["runAsGroup"] == int(gid)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_entry_point_parses(image: str) -> None:
    (entrypoint,) = of(DOCKERFILES[image], "ENTRYPOINT")
    program, subcommand = json.loads(entrypoint)
    assert PYPROJECT["project"]["scripts"][program] == "gateway.cli:main"
    default_args = [json.loads(line) for line in of(DOCKERFILES[image], "CMD")]
    argv = default_args[0] if default_args else []
    if subcommand == "backend":
        argv = ["--repository", "/models"]  # required: the manifests pass it
    parse(SUBCOMMANDS[subcommand], argv)
    docs = [d for d in yaml.safe_load_all(MANIFESTS[image].read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    exposed = {int(p) for line in of(DOCKERFILES[image], "EXPOSE") for p in line.split()}
    assert exposed == {p["containerPort"] for p in container["ports"]}


def test_the_backend_images_runtime_argument_picks_the_gpu_stages() -> None:
    path = DOCKERFILES["backend"]
    assert build_args(path) == {"RUNTIME": "cpu"}, "the plain build is the CPU image"
    froms = [line.split() for line in of(path, "FROM")]
    # The final stage, and the build output it copies, follow the argument.
    assert froms[-1] == ["runtime-${RUNTIME}"]
    assert ["build-${RUNTIME}", "AS", "build"] in froms
    stages = {words[2] for words in froms if len(words) == 3}
    for runtime in RUNTIMES:
        assert {f"build-{runtime}", f"runtime-{runtime}"} <= stages, runtime
    # The cuda build installs the cuda extra, which pyproject pins: cuda-bindings (TVM's
    # NVRTC path imports cuda.bindings.nvrtc), CUDA 13's NVRTC and runtime library (the
    # TVM wheel's libtvm_runtime_cuda links libcudart.so.13), and CCCL's headers.
    (run,) = [rest for k, rest in stage_of(path, "build-cuda") if k == "RUN"]
    assert "'.[backend,cuda]'" in run and "runtime-only" in run
    cuda = PYPROJECT["project"]["optional-dependencies"]["cuda"]
    pinned = dict(spec.split("==") for spec in cuda)
    assert all("==" in spec for spec in cuda), cuda
    for package in (
        "cuda-bindings",
        "nvidia-cuda-nvrtc",
        "nvidia-cuda-runtime",
        "nvidia-cuda-cccl",
    ):
        assert package in pinned, package
    assert pinned["cuda-bindings"].startswith("13.") and pinned["nvidia-cuda-nvrtc"].startswith(
        "13."
    )
    assert "cuda" not in PYPROJECT["project"]["optional-dependencies"]["backend"]
    # The cuda runtime stage points TVM at the wheels' files (site-packages/nvidia/cu13),
    # in the venv the build made, of the project's Python.
    minor = PYPROJECT["project"]["requires-python"].split(",")[0].removeprefix(">=")
    cu13 = f"/opt/switchyard/lib/python{minor}/site-packages/nvidia/cu13"
    env = {}
    for keyword, rest in stage_of(path, "runtime-cuda"):
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    assert env["CUDA_PATH"] == cu13
    assert env["LD_LIBRARY_PATH"] == f"{cu13}/lib"
    assert env["TVM_CUDA_NVRTC_EXTRA_OPTS"] == f"-I{cu13}/include/cccl"
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    # The CPU image sets none of them.
    cpu_env = " ".join(rest for k, rest in stage_of(path, "runtime-cpu") if k == "ENV")
    assert "CUDA" not in cpu_env
