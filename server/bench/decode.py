"""`elasticmoe bench decode`: output tokens/s at several batch sizes for our server (through gRPC,
1 and 2 workers, each server in its own process) and `transformers.generate` on the same
checkpoint, in the same run; and where an engine step's time goes."""
from __future__ import annotations

import argparse
import time

from server.bench.common import ServerProcess, ensure_model, print_table, run_batch, say, write_json

PROMPT_LEN = 32
PHASES = ("attention", "router", "experts", "expert_ffn_on_worker", "lm_head", "inputs", "sample_and_stream",
          "schedule", "step")


def _prompts(n: int, vocab: int) -> list[list[int]]:
    return [[(31 * i + 7 * j) % (vocab - 3) + 3 for j in range(PROMPT_LEN)] for i in range(n)]


def _phase_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    steps = after.get("elasticmoe_engine_steps_total", 0) - before.get("elasticmoe_engine_steps_total", 0)
    out = {"steps": steps}
    for p in PHASES:
        key = f'elasticmoe_engine_step_phase_seconds_total{{phase="{p}"}}'
        out[p] = 1000.0 * (after.get(key, 0.0) - before.get(key, 0.0)) / max(steps, 1)
    return out


def bench_server(model: str, workers: int, batches: list[int], tokens: int, vocab: int,
                 overlap: bool = False) -> list[dict]:
    say(f"starting elasticmoe with {workers} worker(s){', overlapped micro-batches' if overlap else ''}")
    rows = []
    extra = ["--overlap"] if overlap else []
    with ServerProcess(model, workers, "--max-running", str(max(batches)), "--ray-num-cpus", "4", *extra) as srv:
        run_batch(srv.channel, _prompts(2, vocab), 8)   # warm-up: first-touch of weights, JIT paths
        for b in batches:
            m0 = srv.metrics()
            wall, logs = run_batch(srv.channel, _prompts(b, vocab), tokens)
            m1 = srv.metrics()
            errors = [log.error for log in logs if log.error]
            if errors:
                raise RuntimeError(f"{len(errors)} streams failed: {errors[:3]}")
            n = sum(len(log.tokens) for log in logs)
            name = f"elasticmoe ({workers} worker{'s' if workers > 1 else ''}{', overlap' if overlap else ''})"
            row = {"system": name, "batch": b,
                   "tokens": n, "seconds": wall, "tokens_per_s": n / wall, "phases_ms": _phase_ms(m0, m1)}
            say(f"  batch {b:3d}: {row['tokens_per_s']:.1f} tok/s")
            rows.append(row)
    return rows


def bench_transformers(model: str, batches: list[int], tokens: int, vocab: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    say("transformers.generate on the same checkpoint (all cores)")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf.generation_config.eos_token_id = None   # like ignore_eos: every stream makes `tokens` tokens
    rows = []
    with torch.no_grad():
        hf.generate(torch.tensor(_prompts(1, vocab)), max_new_tokens=4, do_sample=False, pad_token_id=0)
        for b in batches:
            ids = torch.tensor(_prompts(b, vocab))
            t0 = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                              pad_token_id=0)
            wall = time.perf_counter() - t0
            n = (out.shape[1] - PROMPT_LEN) * b
            rows.append({"system": "transformers.generate", "batch": b, "tokens": n, "seconds": wall,
                         "tokens_per_s": n / wall})
            say(f"  batch {b:3d}: {n / wall:.1f} tok/s")
    return rows


def _echo(port_queue) -> None:
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    port_queue.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            return
        conn.sendall(memoryview(buf)[:n])


def exchange_floor(nbytes: int, rounds: int = 2000) -> float:
    """Seconds for one bare TCP round trip of `nbytes` between two processes on loopback: the
    floor under one exchange with one worker (no framing, no compute)."""
    import multiprocessing as mp
    import socket

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    child = ctx.Process(target=_echo, args=(q,), daemon=True)
    child.start()
    sock = socket.create_connection(("127.0.0.1", q.get(timeout=30)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload, back = b"x" * nbytes, bytearray(nbytes)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sock.sendall(payload)
        got = 0
        while got < nbytes:
            got += sock.recv_into(memoryview(back)[got:])
        times.append(time.perf_counter() - t0)
    sock.close()
    child.join(timeout=10)
    times.sort()
    return times[len(times) // 2]


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = [(r["batch"], r["tokens_per_s"]) for r in rows if r["system"] == system]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
    ax.set_xlabel("concurrent streams (batch)")
    ax.set_ylabel("output tokens / s")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("decode throughput, same checkpoint, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    say(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    from experts.model.spec import load_spec

    model = ensure_model(args.model)
    spec = load_spec(model)
    batches = [int(b) for b in args.batches.split(",")]
    say(f"{spec.family}: hidden {spec.hidden}, {spec.num_layers} layers, {spec.num_experts} experts top-{spec.top_k}, "
        f"{spec.dtype}; batches {batches}, {args.tokens} tokens each, prompts of {PROMPT_LEN}")
    row_bytes = spec.hidden * 4
    floors = {b: exchange_floor(b * spec.top_k * row_bytes) for b in batches}
    say("bare TCP round trip on loopback (median): " +
        ", ".join(f"{b * spec.top_k} rows {1e6 * f:.0f} us" for b, f in floors.items()))
    rows = bench_server(model, 1, batches, args.tokens, spec.vocab_size)
    rows += bench_server(model, 2, batches, args.tokens, spec.vocab_size)
    rows += bench_server(model, 2, batches, args.tokens, spec.vocab_size, overlap=True)
    if not args.no_transformers:
        rows += bench_transformers(model, batches, args.tokens, spec.vocab_size)
    print()
    print_table(["system", "batch", "tok/s", "step ms", "attention", "router", "exchange", "expert FFN", "other"],
                [[r["system"], r["batch"], r["tokens_per_s"], *_breakdown(r)] for r in rows])
    layers = len(spec.moe_layers)
    print("\nfloor of the exchange: one bare TCP round trip per MoE layer carrying all the step's rows: "
          + ", ".join(f"batch {b}: {1000 * layers * f:.2f} ms/step" for b, f in floors.items()))
    write_json(args.json, {"model": model, "tokens": args.tokens, "prompt_len": PROMPT_LEN, "results": rows,
                           "exchange_floor_ms_per_step": {b: 1000 * layers * f for b, f in floors.items()}})
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _breakdown(row: dict) -> list[object]:
    """step, attention, router, exchange (routing + transport + waiting), expert FFN (slowest worker), other."""
    p = row.get("phases_ms")
    if not p:
        return ["-"] * 6
    if "overlap" in row["system"]:   # phases overlap each other: only the step time adds up
        return [p["step"], p["attention"], p["router"], "-", "-", "-"]
    exchange = p["experts"] - p["expert_ffn_on_worker"]
    other = p["step"] - p["attention"] - p["router"] - p["experts"]
    return [p["step"], p["attention"], p["router"], exchange, p["expert_ffn_on_worker"], other]
