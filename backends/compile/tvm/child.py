"""The compile in a fresh Python process, `python -m backends.compile.tvm.child`: the
request as JSON on the child's stdin; progress, then the build or the error, as JSON lines
back on its stdout. Errors arrive in the parent as the same exception types.

The parent side (`compile_in_child`, which `build.compile_onnx` calls) starts the child and
never loads TVM's compiler, and the child's start-up is not slowed by the modules the
parent has loaded. The child side (`main`) runs `build.compile_in_process`. Must not import
TVM at module level, nor anything from gateway/. Nothing is read from the environment or
argv at import time.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from backends.compile.tvm.build import TvmBuild, compile_in_process
from backends.compile.tvm.importer import TvmImportError
from backends.compile.tvm.search import TuningUnavailable
from backends.compile.tvm.targets import TvmTarget
from backends.compile.tvm.toolchain import ToolchainMissing, error_summary

_logger = logging.getLogger(__name__)


# Exceptions a child reports by name and the parent raises again.
_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e for e in (TvmImportError, ToolchainMissing, TuningUnavailable, ValueError)
}


class CompileFailed(Exception):
    """The compile process failed in a way the other errors do not describe."""


def compile_in_child(
    source: Path,
    out_dir: Path,
    target: TvmTarget,
    input_shapes: Mapping[str, Sequence[int]],
    tuning_dir: Path | None,
    trials: int,
    progress: Callable[[str], None] | None,
    population: int | None,
    seed: int | None,
    records_from: Path | None,
) -> TvmBuild:
    """The parent side: `compile_in_process` with these arguments, run in a fresh
    `python -m backends.compile.tvm.child`; its progress goes to `progress`."""
    started = time.perf_counter()
    say = progress or (lambda message: _logger.info("%s", message))
    request = {
        "source": str(source),
        "out_dir": str(out_dir),
        "target": {
            "name": target.name,
            "target": dict(target.target),
            "required_cpu_flags": list(target.required_cpu_flags),
            "host": None if target.host is None else dict(target.host),
        },
        "input_shapes": {k: list(v) for k, v in input_shapes.items()},
        "tuning_dir": None if tuning_dir is None else str(tuning_dir),
        "trials": trials,
        "population": population,
        "seed": seed,
        "records_from": None if records_from is None else str(records_from),
    }
    env = dict(os.environ)
    env.pop("TVM_USE_RUNTIME_LIB", None)  # the child needs the compiler
    # The child imports this module the way this process did.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    outcome: dict[str, Any] | None = None
    with subprocess.Popen(
        [sys.executable, "-m", __name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(request))
        child.stdin.close()
        for line in child.stdout:
            message = json.loads(line)
            if "progress" in message:
                say(str(message["progress"]))
            else:
                outcome = message
    if outcome is None:
        raise CompileFailed(
            f"the TVM compile process for {source} ({target.name}) exited with status "
            f"{child.returncode} without a result (see its stderr)"
        )
    if "error" in outcome:
        error = outcome["error"]
        raise _ERRORS.get(error["type"], CompileFailed)(error["message"])
    built = outcome["build"]
    return TvmBuild(
        library=Path(built["library"]),
        target=target,
        input_shapes=built["input_shapes"],
        output_shapes=built["output_shapes"],
        tuned=built["tuned"],
        trials=built["trials"],
        trial_budget=built["trial_budget"],
        tasks=built["tasks"],
        tvm_version=built["tvm_version"],
        compile_s=time.perf_counter() - started,
        tuning_reused=built["tuning_reused"],
        imported_via_ort=built["imported_via_ort"],
        task_keys=tuple(built["task_keys"]),
    )


def main() -> int:
    """The compile process: a JSON request on stdin; JSON lines (progress, then the build
    or the error) on its original stdout. Everything else written to stdout, by TVM or
    MetaSchedule, goes to stderr instead."""
    request = json.loads(sys.stdin.read())
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(message: Mapping[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")

    spec = request["target"]
    target = TvmTarget(
        name=spec["name"],
        target=spec["target"],
        required_cpu_flags=tuple(spec["required_cpu_flags"]),
        host=spec["host"],
    )
    try:
        build = compile_in_process(
            Path(request["source"]),
            Path(request["out_dir"]),
            target,
            request["input_shapes"],
            None if request["tuning_dir"] is None else Path(request["tuning_dir"]),
            request["trials"],
            lambda message: reply({"progress": message}),
            request["population"],
            request["seed"],
            None if request["records_from"] is None else Path(request["records_from"]),
        )
    except tuple(_ERRORS.values()) as exc:
        reply({"error": {"type": type(exc).__name__, "message": str(exc)}})
        return 1
    except Exception as exc:
        reply({"error": {"type": "CompileFailed", "message": error_summary(exc)}})
        raise
    reply(
        {
            "build": {
                "library": str(build.library),
                "input_shapes": build.input_shapes,
                "output_shapes": build.output_shapes,
                "tuned": build.tuned,
                "trials": build.trials,
                "trial_budget": build.trial_budget,
                "tasks": build.tasks,
                "tvm_version": build.tvm_version,
                "tuning_reused": build.tuning_reused,
                "imported_via_ort": build.imported_via_ort,
                "task_keys": list(build.task_keys),
            }
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
