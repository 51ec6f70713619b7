"""`elasticmoe bench WHICH`: benchmarks, kept out of `make test` (each prints a table, and writes
JSON with --json and a PNG with --plot)."""
from __future__ import annotations

import argparse


def run_bench(args: argparse.Namespace) -> int:
    if args.which == "decode":
        from server.bench.decode import run
    elif args.which == "scaling":
        from server.bench.scaling import run
    elif args.which == "kernels":
        from server.engine.threads import passive_openmp

        passive_openmp()   # as in a worker: OpenMP sleeps between calls (set before torch loads)
        from server.bench.kernels import run
    elif args.which == "http":
        from server.bench.http import run
    elif args.which == "chaos":
        from server.bench.chaos import run
    else:
        raise ValueError(f"unknown benchmark {args.which!r}")
    return run(args)
