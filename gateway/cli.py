"""`switchyard`: the one command-line entry point.

Subcommands parse their own arguments here and hand off to their modules; no
module reads argv or the environment at import time. Only the module of the
subcommand given is imported (`switchyard admin routes` does not load the serving
stack, the compiler and the simulator to list routes); `switchyard --help` lists
every subcommand from the help strings here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

COMMANDS = {
    "serve": "run the gateway (default: the embedded demo fleet)",
    "backend": "run one backend worker over a model repository",
    "compile": "build and check every variant of a model",
    "profile": "measure every variant on each hardware class",
    "report": "the shop-around table and chart",
    "simulate": "the router against modelled backends and baselines (a scenario file)",
    "load": "open-loop load from a scenario against a live gateway, with a report",
    "admin": "the SRE's controls over a running gateway",
}

Runner = Callable[[argparse.Namespace], int]


def command_module(command: str, parser: argparse.ArgumentParser) -> Runner:
    """Imports `command`'s module, adds its arguments to `parser`, and returns what
    runs it."""
    if command == "serve":
        from gateway import server

        server.add_arguments(parser)
        return server.run
    if command == "backend":
        from backends.worker import server as worker

        worker.add_arguments(parser)
        return worker.run
    if command == "compile":
        from backends.compile import compiler

        compiler.add_arguments(parser)

        def run_compile(args: argparse.Namespace) -> int:
            from gateway.config import fleet_hardware

            return compiler.run(args, read_fleet=fleet_hardware)

        return run_compile
    if command in ("profile", "report"):
        from gateway.report import shoparound

        if command == "profile":
            shoparound.add_profile_arguments(parser)
            return shoparound.run_profile
        shoparound.add_report_arguments(parser)
        return shoparound.run_report
    if command == "simulate":
        from gateway.sim import simulate

        simulate.add_arguments(parser)
        return simulate.run
    if command == "load":
        from gateway.loadtest import load

        load.add_arguments(parser)
        return load.run
    if command == "admin":
        from gateway.control import admin_cli

        admin_cli.add_arguments(parser)
        return admin_cli.run
    raise ValueError(f"unknown command {command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="switchyard",
        description="Open Inference Protocol gateway routing each request to the cheapest "
        "backend that meets its latency SLA.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text) for name, text in COMMANDS.items()}
    # The top-level parser takes no option but --help, so the first word that is not an
    # option names the subcommand; only its module is loaded.
    given = next((a for a in arguments if not a.startswith("-")), None)
    runners = {given: command_module(given, parsers[given])} if given in parsers else {}
    args = parser.parse_args(arguments)
    runner = runners.get(args.command)
    if runner is None:
        parser.error(f"unknown command {args.command}")
    return runner(args)


if __name__ == "__main__":
    sys.exit(main())
