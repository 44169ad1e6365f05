"""`switchyard`'s entry point: every subcommand is listed, and only the module of the
one given is loaded (an SRE's `switchyard admin routes` does not import the serving
stack, the compiler or the simulator, nor the admin API's server side, the control plane,
the router or numpy)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]

HEAVY = (
    "gateway.server",
    "backends.compile.compiler",
    "gateway.sim.simulate",
    "gateway.loadtest.load",
    "gateway.control.admin",
    "gateway.control.plane",
    "gateway.routing.router",
    "numpy",
)


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for name, command in COMMANDS.items():
        assert name in shown and command.help in shown


def test_every_subcommand_names_functions_its_module_has() -> None:
    for name, command in COMMANDS.items():
        module = importlib.import_module(command.module)
        assert callable(getattr(module, command.add_arguments, None)), name
        assert callable(getattr(module, command.run, None)), name


def test_an_unknown_subcommand_is_refused_naming_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["nope"])
    assert exited.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_only_the_given_subcommands_module_is_imported() -> None:
    script = (
        "import sys\n"
        "from gateway.cli import main\n"
        "try:\n"
        "    main(['admin', '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print('gateway.control.admin_cli' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-2:] == ["[]", "True"], done.stdout
