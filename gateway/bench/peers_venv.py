"""`python -m gateway.bench.peers_venv [DIR]`: the peers' virtualenv (KServe 0.21 and its
ONNX Runtime, default `.bench/peers-venv`), made once where it is missing or stale, so that
`make test` installs it with everything else before the tests start, not inside the first
test that needs it. The bench and the foreign-backend tests use it as they find it."""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.bench.harness import BenchError, ensure_peers_venv

DEFAULT = Path(".bench") / "peers-venv"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    venv = Path(args[0]) if args else DEFAULT
    try:
        python = ensure_peers_venv(venv, log=print)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"peers' virtualenv ready: {python}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
