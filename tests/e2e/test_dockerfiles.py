"""The images' Dockerfiles (deploy/gateway.Dockerfile, deploy/backend.Dockerfile), read
without a container runtime: what they COPY exists in the build context, the packages
they install are the project's (with extras it declares), the commands they RUN are real
(the runtime-only install is run against an empty site-packages), the base images carry
pinned tags, the user is the non-root number the Kubernetes manifests run as, and the
entry point with its default arguments parses with the real command-line parser."""

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


def parse(add_arguments: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_base_images_are_pinned_to_the_project_python(image: str) -> None:
    python = PYPROJECT["project"]["requires-python"]  # ">=3.11,<3.12"
    minor = python.split(",")[0].removeprefix(">=")
    stages: set[str] = set()
    for line in of(DOCKERFILES[image], "FROM"):
        words = line.split()
        base = words[0]
        if base not in stages:
            name, _, tag = base.partition(":")
            assert name == "python", base
            assert tag.startswith(f"{minor}.") and tag != "latest", f"{base}: pin a patch release"
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
