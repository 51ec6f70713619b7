"""`elasticmoe bench http`: the OpenAI-compatible HTTP API driven by a load generator from PyPI
(NVIDIA's aiperf), which reports TTFT, inter-token latency and throughput as it measures them.

aiperf lives in its own environment (its dependencies pin versions our server does not use):
`python -m venv .aiperf && .aiperf/bin/pip install aiperf`, then `--aiperf .aiperf/bin/aiperf`.
It runs offline: its synthetic prompts come from a corpus inside the package, and its tokenizer is
the checkpoint's own (`--tokenizer` is the model directory), so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from server.bench.common import ServerProcess, ensure_model, free_port, say

METRICS = (("time_to_first_token", "TTFT ms"), ("inter_token_latency", "ITL ms"),
           ("request_latency", "request ms"))
PERCENTILES = ("p50", "p90", "p99")


def _aiperf(args: argparse.Namespace) -> str:
    exe = args.aiperf or shutil.which("aiperf")
    if not exe or not os.access(exe, os.X_OK):
        raise ValueError("no aiperf: install it in its own environment (python -m venv .aiperf && "
                         ".aiperf/bin/pip install aiperf) and pass --aiperf .aiperf/bin/aiperf")
    return exe


def _profile(exe: str, model: str, url: str, out: Path, concurrency: int, requests: int, input_tokens: int,
             output_tokens: int, endpoint: str) -> dict:
    cmd = [exe, "profile", "--model", model, "--url", url, "--endpoint-type", endpoint, "--streaming",
           "--tokenizer", model, "--concurrency", str(concurrency), "--request-count", str(requests),
           "--synthetic-input-tokens-mean", str(input_tokens), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(output_tokens), "--output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--artifact-dir", str(out), "--ui-type", "none",
           # our /v1/completions takes max_tokens as OpenAI's does; nothing here to scrape for GPUs
           "--use-legacy-max-tokens", "--no-server-metrics", "--no-gpu-telemetry",
           # tokens as the server counted them (usage): re-tokenizing streamed text with a byte-level
           # BPE merges pieces and undercounts
           "--use-server-token-count"]
    # Offline without HF_HUB_OFFLINE: aiperf (0.13) takes that as "look the name up in the hub
    # cache" and fails on a directory path, while a directory path alone is loaded from disk with
    # no hub call at all (it tests for a local path first).
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip()
        raise RuntimeError(f"aiperf failed ({done.returncode}): {said[-3000:]}")
    found = sorted(out.rglob("profile_export_aiperf.json"))
    if not found:
        raise RuntimeError(f"aiperf wrote no profile_export_aiperf.json under {out}")
    return json.loads(found[-1].read_text())


def _row(label: str, concurrency: int, result: dict) -> dict:
    row: dict = {"endpoint": label, "concurrency": concurrency}
    for key, name in METRICS:
        stats = result.get(key) or {}
        for p in PERCENTILES:
            row[f"{name} {p}"] = stats.get(p)
    row["output tok/s"] = (result.get("output_token_throughput") or {}).get("avg")
    row["requests/s"] = (result.get("request_throughput") or {}).get("avg")
    return row


def _print(rows: list[dict]) -> None:
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols))


def run(args: argparse.Namespace) -> int:
    exe = _aiperf(args)
    model = os.path.abspath(ensure_model(args.model))
    http_port = free_port()
    rows: list[dict] = []
    workers = int(str(args.workers).split(",")[-1])
    with ServerProcess(model, workers, "--http-port", str(http_port)) as server:
        url = f"http://127.0.0.1:{http_port}"
        say(f"server ready: gRPC {server.address}, HTTP {url}; aiperf {exe}")
        for concurrency in [int(c) for c in args.batches.split(",")]:
            for endpoint in ("completions", "chat"):
                with tempfile.TemporaryDirectory(prefix="aiperf-") as tmp:
                    say(f"{endpoint}, {concurrency} concurrent: {args.requests} requests of "
                        f"{args.input_tokens} -> {args.tokens} tokens")
                    result = _profile(exe, model, url, Path(tmp), concurrency, args.requests, args.input_tokens,
                                      args.tokens, endpoint)
                rows.append(_row(endpoint, concurrency, result))
    _print(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"bench": "http", "model": model, "rows": rows}, indent=2) + "\n")
    return 0
