"""`switchyard`: the one command-line entry point.

Subcommands parse their own arguments here and hand off to their modules; no
module reads argv or the environment at import time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="switchyard",
        description="Open Inference Protocol gateway routing each request to the cheapest "
        "backend that meets its latency SLA.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway (default: the embedded demo fleet)")
    from gateway import server

    server.add_arguments(serve)

    backend = sub.add_parser("backend", help="run one backend worker over a model repository")
    from backends.worker import server as worker

    worker.add_arguments(backend)

    compile_ = sub.add_parser("compile", help="build and check every variant of a model")
    from backends.compile import compiler

    compiler.add_arguments(compile_)

    from gateway.report import shoparound

    profile = sub.add_parser("profile", help="measure every variant on each hardware class")
    shoparound.add_profile_arguments(profile)
    report = sub.add_parser("report", help="the shop-around table and chart")
    shoparound.add_report_arguments(report)

    from gateway.sim import simulate

    simulate_ = sub.add_parser(
        "simulate", help="the router against modelled backends and baselines (a scenario file)"
    )
    simulate.add_arguments(simulate_)

    from gateway.loadtest import load

    load_ = sub.add_parser(
        "load", help="open-loop load from a scenario against a live gateway, with a report"
    )
    load.add_arguments(load_)

    from gateway.control import admin_cli

    admin = sub.add_parser("admin", help="the SRE's controls over a running gateway")
    admin_cli.add_arguments(admin)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return server.run(args)
    if args.command == "backend":
        return worker.run(args)
    if args.command == "compile":
        from gateway.config import fleet_hardware

        return compiler.run(args, read_fleet=fleet_hardware)
    if args.command == "profile":
        return shoparound.run_profile(args)
    if args.command == "report":
        return shoparound.run_report(args)
    if args.command == "simulate":
        return simulate.run(args)
    if args.command == "load":
        return load.run(args)
    if args.command == "admin":
        return admin_cli.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
