"""`switchyard`: the one command-line entry point.

Subcommands parse their own arguments here and hand off to their modules; no
module reads argv or the environment at import time. Only the module of the
subcommand given is imported (`switchyard admin routes` does not load the serving
stack, the compiler and the simulator to list routes); `switchyard --help` lists
every subcommand from the help strings here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Runner = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, and the module whose functions add its arguments
    and run it."""

    help: str
    module: str
    add_arguments: str = "add_arguments"
    run: str = "run"


COMMANDS = {
    "serve": Command("run the gateway (default: the embedded demo fleet)", "gateway.server"),
    "backend": Command("run one backend worker over a model repository", "backends.worker.server"),
    "compile": Command("build and check every variant of a model", "backends.compile.compiler"),
    "profile": Command(
        "measure every variant on each hardware class",
        "gateway.report.shoparound",
        "add_profile_arguments",
        "run_profile",
    ),
    "report": Command(
        "the shop-around table and chart",
        "gateway.report.shoparound",
        "add_report_arguments",
        "run_report",
    ),
    "simulate": Command(
        "the router against modelled backends and baselines (a scenario file)",
        "gateway.sim.simulate",
    ),
    "load": Command(
        "open-loop load from a scenario against a live gateway, with a report",
        "gateway.loadtest.load",
    ),
    "admin": Command("the SRE's controls over a running gateway", "gateway.control.admin_cli"),
}


def command_runner(name: str, parser: argparse.ArgumentParser) -> Runner:
    """Imports subcommand `name`'s module, adds its arguments to `parser`, and returns
    what runs it."""
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    getattr(module, command.add_arguments)(parser)
    run: Runner = getattr(module, command.run)
    if name != "compile":
        return run
    compile_model: Callable[..., int] = run

    def run_compile(args: argparse.Namespace) -> int:
        # The backends import nothing from the gateway: the fleet file's reader comes
        # from here, once the command runs.
        from gateway.config import fleet_hardware

        return compile_model(args, read_fleet=fleet_hardware)

    return run_compile


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="switchyard",
        description="Open Inference Protocol gateway routing each request to the cheapest "
        "backend that meets its latency SLA.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=c.help) for name, c in COMMANDS.items()}
    # The top-level parser takes no option but --help, so the first word that is not an
    # option names the subcommand; only its module is loaded.
    given = next((a for a in arguments if not a.startswith("-")), None)
    runners = {given: command_runner(given, parsers[given])} if given in parsers else {}
    args = parser.parse_args(arguments)
    runner = runners.get(args.command)
    if runner is None:
        parser.error(f"unknown command {args.command}")
    return runner(args)


if __name__ == "__main__":
    sys.exit(main())
