"""`elasticmoe bench kernels`: one MoE layer's routed experts, ms per layer, on the worker's two paths.

- `run_grouped`: the pure-torch loop of F.linear per expert over plain weights (experts/kernels/ffn.py).
- `fused`: what a worker runs: the layer's experts prepacked in /dev/shm segments, mapped into a
  slot range, one `run_slots` call (vLLM's `cpu_fused_moe` when its op library loads).

The layer is the bench model's (hidden 512, 8 experts, top-2, intermediate 1024), or the one of
`--model` when that directory holds a checkpoint; weights are random (speed does not depend on
them). Tokens 1/8/16/32 (`--batches`), float32 and bfloat16 (`--dtypes`), `--threads` OpenMP
threads (2). Each cell is the median of `--repeat` timed calls after warm-up; the table also
shows the largest difference between the two paths' outputs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from experts.kernels.ffn import run_grouped
from experts.kernels.moe import MoEKernel, run_slots, select_kernel
from memory.segments import ExpertSegment, ExpertShape, segment_name, unlink_namespace
from memory.slot_range import HostSlotRange
from server.bench.common import print_table, say, write_json

BENCH_LAYER = {"hidden": 512, "experts": 8, "top_k": 2, "intermediate": 1024}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Layer:
    hidden: int
    experts: int
    top_k: int
    intermediate: int


def _layer(model: str) -> Layer:
    if (Path(model) / "config.json").exists():
        from experts.model.spec import load_spec

        spec = load_spec(model)
        return Layer(spec.hidden, spec.num_experts, spec.top_k, spec.expert_intermediate)
    return Layer(**BENCH_LAYER)


def _median_ms(fn, repeat: int) -> float:
    for _ in range(max(3, repeat // 10)):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _bench_dtype(layer: Layer, dtype: torch.dtype, kernel: MoEKernel, batches: list[int], repeat: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    d, i, e = layer.hidden, layer.intermediate, layer.experts
    w13 = (torch.randn(e, 2 * i, d, generator=g) / d ** 0.5).to(dtype)
    w2 = (torch.randn(e, d, i, generator=g) / i ** 0.5).to(dtype)
    shape = ExpertShape(d, i, dtype)
    namespace = f"bench{os.getpid()}{uuid.uuid4().hex[:6]}"
    rng = HostSlotRange(e, shape)
    segments = []
    try:
        for x in range(e):
            seg = ExpertSegment.create(segment_name(namespace, 0, x, "kernels"), shape)
            segments.append(seg)
            kernel.prepack(w13[x:x + 1], seg.gate_up.unsqueeze(0))
            kernel.prepack(w2[x:x + 1], seg.down.unsqueeze(0))
            rng.map(x, seg.name)    # slot x holds expert x: the translation is the identity here
        rows = []
        for m in batches:
            # the pairs of m tokens routed top-k, grouped by expert, as the engine sends them
            topk = torch.stack([torch.randperm(e, generator=g)[:layer.top_k] for _ in range(m)]).flatten()
            order = torch.argsort(topk, stable=True)
            groups, counts = torch.unique_consecutive(topk[order], return_counts=True)
            groups, counts = groups.tolist(), counts.tolist()
            x = torch.randn(m * layer.top_k, d, generator=g).to(dtype)
            weights = torch.rand(m * layer.top_k, generator=g)
            with torch.inference_mode():
                ref = run_grouped(0, x, groups, counts, weights, lambda _, j: (w13[j], w2[j]))
                got = run_slots(kernel, rng, x, groups, counts, weights)
                grouped_ms = _median_ms(lambda: run_grouped(0, x, groups, counts, weights, lambda _, j: (w13[j], w2[j])),
                                        repeat)
                fused_ms = _median_ms(lambda: run_slots(kernel, rng, x, groups, counts, weights), repeat)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "tokens": m, "pairs": m * layer.top_k,
                         "run_grouped_ms": grouped_ms, "fused_ms": fused_ms, "speedup": grouped_ms / fused_ms,
                         "max_abs_diff": (got - ref).abs().max().item()})
        return rows
    finally:
        rng.close()
        for seg in segments:
            seg.close()
        unlink_namespace(namespace)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        pts = [r for r in rows if r["dtype"] == dt]
        for key, label in (("run_grouped_ms", "run_grouped (F.linear per expert)"), ("fused_ms", "fused over slot range")):
            ax.plot([r["tokens"] for r in pts], [r[key] for r in pts], marker="o", label=label)
        ax.set_title(f"one MoE layer, {dt}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms per layer")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    say(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    layer = _layer(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    threads = getattr(args, "threads", 2)
    torch.set_num_threads(threads)
    rows, kernels = [], {}
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            raise ValueError(f"--dtypes: {name!r} is not one of {sorted(DTYPES)}")
        choice = select_kernel(layer.hidden, layer.intermediate, DTYPES[name])
        kernels[name] = f"{choice.kernel.name} ({choice.reason})"
        say(f"{name}: {kernels[name]}")
        rows += _bench_dtype(layer, DTYPES[name], choice.kernel, batches, getattr(args, "repeat", 200))
    policy = os.environ.get("OMP_WAIT_POLICY", "(libgomp default: spin)")
    say(f"one MoE layer: hidden {layer.hidden}, {layer.experts} experts top-{layer.top_k}, intermediate "
        f"{layer.intermediate}; {threads} threads, OMP_WAIT_POLICY={policy}; median ms per layer")
    print_table(["dtype", "tokens", "run_grouped ms", "fused ms", "speedup", "max |diff|"],
                [[r["dtype"], r["tokens"], r["run_grouped_ms"], r["fused_ms"], r["speedup"], f"{r['max_abs_diff']:.1e}"]
                 for r in rows])
    write_json(args.json, {"layer": layer.__dict__, "threads": threads, "omp_wait_policy": policy, "kernels": kernels,
                           "results": rows, "load_average": os.getloadavg()})
    if args.plot:
        _plot(rows, args.plot)
    return 0
