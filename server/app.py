"""Assembling a server: engine, Ray workers, controller, gRPC, metrics, autoscaler; and its shutdown."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from typing import Callable

import torch
from tokenizers import Tokenizer

from experts.model.checkpoint import Checkpoint
from experts.model.decoder import MoEModel
from experts.model.kv_cache import KVCache
from experts.model.dtypes import TORCH_DTYPES
from experts.model.spec import load_spec
from memory.kv_blocks import KVBlockTable
from memory.owners import claim_namespace, disown_namespace, sweep_orphans
from memory.segments import unlink_namespace
from experts.wire.config import LOOPBACK, WireConfig
from server.control import cluster
from server.config import ServerConfig
from server.control.controller import Controller
from server.control.operations import Operation, OperationRegistry, OperationRunner, PhaseReport
from server.control.rebalance import ExpertLoadWindow, Rebalancer, plan_rebalance
from experts.placement.balance import RebalanceRule
from server.control.failover import Failover
from server.control.topology import ChangeReport, ScaleRejected
from server.engine.loop import Engine
from server.engine.threads import step_threads
from server.engine.request import EngineObserver, Request
from server.api.deadline import WriteDeadline
from server.api.front import GrpcFront
from server.api.grpc_service import AdminServicer, InferenceServicer
from server.api.chat_template import load_chat_template
from server.api.http_service import HttpApi, HttpFront
from server.api.prompts import PromptEncoder
from server.autoscale.windows import LatencyWindow, RateWindow
from server.metrics import ServerMetrics
from server.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


class ServingStats(EngineObserver):
    """Feeds Prometheus and the rolling windows the autoscaler reads."""

    def __init__(self, metrics: ServerMetrics, window_s: float = 30.0) -> None:
        self.metrics = metrics
        self.ttft = LatencyWindow(window_s)
        self.itl = LatencyWindow(window_s)
        self.tokens = RateWindow(window_s)
        self._last_gauges = 0.0
        self.load_window: ExpertLoadWindow | None = None   # the rebalancer's; set by the server

    def set_window(self, window_s: float) -> None:
        """Measure the rolling windows over `window_s` from now on (the autoscaler's policy sets
        it before its first tick). Samples taken so far are dropped; an add racing the swap may
        land in the old window and be lost, which costs one sample, never a wrong one."""
        self.ttft, self.itl, self.tokens = LatencyWindow(window_s), LatencyWindow(window_s), RateWindow(window_s)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.add(ttft_s, time.monotonic())

    def on_token_gap(self, seconds: float) -> None:
        self.metrics.inter_token(seconds)
        self.itl.add(seconds, time.monotonic())

    def on_finish(self, req: Request, status: str, completion_tokens: int) -> None:
        now = time.monotonic()
        ttft = (req.first_token - req.arrival) if req.first_token is not None else None
        self.metrics.request_finished(status, duration_s=now - req.arrival, ttft_s=ttft)
        self.metrics.tokens(prompt=len(req.prompt_ids))

    def on_expert_tokens(self, layer: int, counts) -> None:
        self.metrics.expert_tokens(layer, counts)
        if self.load_window is not None:
            self.load_window.add(layer, counts)

    def on_refused(self, status: str) -> None:
        self.metrics.request_finished(status)

    def on_step(self, running: int, waiting: int, kv_usage: float, tokens: int) -> None:
        now = time.monotonic()
        if tokens:
            self.metrics.tokens(generated=tokens)
            self.tokens.add(tokens, now)
        if now - self._last_gauges > 0.2 or tokens == 0:
            self._last_gauges = now
            self.metrics.queue(running, waiting)
            self.metrics.kv_cache_usage(kv_usage)


class _FailoverMetrics:
    """What the failover reports, into Prometheus (server/control/failover.py's observer)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def worker_lost(self, worker_id: str) -> None:
        self.metrics.worker_lost()

    def failover_committed(self, seconds: float, report: ChangeReport) -> None:
        self.metrics.failover(seconds)
        for path, n in (("remap", report.bytes_remapped), ("peer", report.bytes_copied),
                        ("disk", report.bytes_loaded)):
            if n:
                self.metrics.bytes_moved(path, n)

    def failover_failed(self, error: str) -> None:
        self.metrics.failover_failed()

    def degraded(self, on: bool) -> None:
        self.metrics.degraded(on)


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # the engine's threads: its CPUs but one for decode steps, all of them for wide steps (server/engine/threads.py)
        self.threads = step_threads(config.engine_threads)
        self.spec = load_spec(config.model, config.dtype)
        self.tokenizer = Tokenizer.from_file(os.path.join(config.model, "tokenizer.json"))
        self.namespace = uuid.uuid4().hex[:8]
        self.metrics = ServerMetrics()
        self.stats = ServingStats(self.metrics)
        self.stats.load_window = ExpertLoadWindow(self.spec.moe_layers, self.spec.num_experts,
                                                  config.rebalance_window_s)
        self.operations = OperationRunner(OperationRegistry())
        self.rebalancer: Rebalancer | None = None
        self._stopping = threading.Event()
        self.front: GrpcFront | None = None
        self.admin_address: str | None = None   # Admin's own address, when not beside Inference
        self.engine: Engine | None = None     # shutdown() must work after a start that failed midway
        self.controller: Controller | None = None
        self.http: HttpFront | None = None
        self.http_port = config.http_port
        self.autoscaler = None
        self.failover: Failover | None = None
        self.started_ray = False
        self._ray_down = threading.Event()   # set once ray.shutdown returned (_connect_ray)
        self.port = config.port
        self.metrics_port = config.metrics_port

    def _progress(self, msg: str) -> None:
        log.info(msg)

    def start(self) -> None:
        c, spec = self.config, self.spec
        if c.autoscale:   # a bad policy file fails here, before anything is started
            from server.autoscale.policy import AutoscalePolicy
            AutoscalePolicy.from_yaml(c.autoscale)
        self._progress(f"loading {spec.family} from {c.model}: {len(spec.moe_layers)} MoE layers x "
                       f"{spec.num_experts} experts, {spec.dtype}")
        weights = Checkpoint(c.model).dense_state(TORCH_DTYPES[spec.dtype])
        model = MoEModel(spec, weights)
        blocks = KVBlockTable(c.num_blocks, c.block_size)
        cache = KVCache(spec, c.num_blocks, c.block_size)
        scheduler = Scheduler(blocks, c.max_waiting, c.max_running, c.max_step_tokens)
        max_len = min(c.max_model_len or spec.max_position, spec.max_position)
        self.engine = Engine(model, self.tokenizer, blocks, cache, scheduler, max_len, self.stats, c.overlap,
                             self.threads)
        self.metrics.watch_engine_phases(self.engine.profile.snapshot)
        self.engine.start()
        self.controller = Controller(
            spec, os.path.abspath(c.model), self.namespace, self._commit,
            cluster.WorkerResources(c.worker_cpus, c.worker_gpus), c.slots_per_worker, c.standby,
            c.prepare_timeout_s, self._expert_load, c.replicate_hot, worker_timeout=c.worker_timeout_s,
            redundant_experts=c.redundant_experts, share_node=c.share_node_experts, node_lead=c.node_lead,
            # workers listen on loopback unless the server joins a cluster that spans nodes
            wire=WireConfig.generate(c.max_step_tokens, None if c.ray_address else LOOPBACK))
        self.metrics.watch_worker_connections(self.controller.refused_connections)
        # the restore after a loss (a process start) waits for the engine's first step without the lost worker
        self.failover = Failover(self.controller, _FailoverMetrics(self.metrics), stopping=self._stopping,
                                 engine=self.engine)
        self.engine.on_worker_lost = self.failover.lost
        # segments of servers killed without cleaning up (SIGKILL) go before ours are made; then
        # this server's own claim on the namespace (memory/owners.py)
        swept = sweep_orphans()
        if swept:
            log.warning("removed segments of servers that are gone: %s", swept)
        claim_namespace(self.namespace)
        # ports first: a port already taken fails the start before Ray or any worker is started;
        # health answers NOT_SERVING until the experts are in place (requests meanwhile wait)
        self._start_grpc()
        if c.http_port >= 0:
            self._start_http()
        if c.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(c.host, c.metrics_port)
        self._progress(f"joining Ray at {c.ray_address}" if c.ray_address else "starting an embedded Ray")
        self.started_ray = self._connect_ray()
        self._progress(f"starting {c.workers} expert workers on Ray")
        self.scale(c.workers)
        self.front.set_serving(True)
        if self.http is not None:
            self.http.set_serving(True)
        if c.standby:
            self._progress(f"starting {c.standby} standby workers")
            self.controller.fill_standby()
        if c.autoscale:
            self._start_autoscaler(c.autoscale)
        self._start_rebalancer()
        self._progress(f"serving on {c.host}:{self.port}" + (f", Admin on {self.admin_address}" if self.admin_address
                       else "") + (f" (metrics on :{self.metrics_port}/metrics)" if c.metrics_port >= 0 else ""))

    def _connect_ray(self) -> bool:
        """Join or start Ray without Ray taking SIGTERM from this process, which drains on it.

        Two handlers of Ray's would: ray.init on the main thread installs a Python one (sys.exit
        wherever the main thread is), and the driver's core worker a C++ failure handler that, after
        passing the signal on, arms a 3 s alarm that aborts the process (SIGABRT). So ray.init runs
        on a thread of its own (Ray installs its Python handler from the main thread only), the
        driver's C++ failure handler is off (Ray's switch for processes with their own signal
        handling; the worker processes keep theirs), and the handlers in place before are put back
        (signal.signal also resets the C-level one). A signal meanwhile reaches ours.
        That thread lives until Ray is shut down: the processes ray.init starts die with the thread
        that started them (PR_SET_PDEATHSIG is per thread). Blocking the signals around ray.init
        would not do: Ray's processes inherit the mask, and a raylet that ignores SIGTERM outlives
        ray.shutdown."""
        import ray._private.ray_constants as ray_constants

        c = self.config
        kept = {}
        if threading.current_thread() is threading.main_thread():
            kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        outcome: list[bool | BaseException] = []
        connected = threading.Event()

        def own_ray() -> None:
            try:
                outcome.append(cluster.connect(c.ray_address, c.ray_num_cpus))
            except BaseException as exc:   # raised again on the calling thread
                outcome.append(exc)
            connected.set()
            if outcome[0] is True:
                self._ray_down.wait()

        threading.Thread(target=own_ray, name="ray-owner", daemon=True).start()
        connected.wait()
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _commit(self, backend) -> None:
        self.engine.commit(backend, backend.routing.version)
        self.metrics.topology_version(backend.routing.version)
        self.metrics.workers(len(backend.routing.workers))
        self.metrics.computing_workers(len(backend.routing.serving))

    def _expert_load(self) -> list[list[float]] | None:
        load = self.engine.expert_load
        return load.astype(float).tolist() if load.sum() > 0 else None

    def scale(self, num_workers: int) -> ChangeReport:
        """Change the worker count live and wait for the commit; metrics record the outcome either way."""
        return self.scale_operation(num_workers).report

    def scale_operation(self, num_workers: int, operation_id: str = "", no_wait: bool = False) -> Operation:
        """The same change as an operation (server/control/operations.py): a retry with the same
        id joins it; `no_wait` returns once it is planned."""
        return self.operations.run("scale", num_workers, lambda on_phase: self._scale(num_workers, on_phase),
                                   operation_id, wait=not no_wait)

    def rebalance(self, operation_id: str = "", no_wait: bool = False,
                  load: list[list[float]] | None = None) -> Operation:
        """Re-place experts by the load of the rebalance window (or `load`) on the same workers."""
        assert self.controller is not None
        topo = self.controller.topology
        return self.operations.run(
            "rebalance", len(topo.workers) if topo else 0,
            lambda on_phase: self._recorded("rebalance", True, lambda: self.controller.rebalance(
                load if load is not None else self._window_load(), on_phase)),
            operation_id, wait=not no_wait)

    def _window_load(self) -> list[list[float]]:
        """[L][E] tokens of the rebalance window; since start when the window is empty; else even."""
        window = self.stats.load_window.load()
        if window.sum() > 0:
            return window.astype(float).tolist()
        return self._expert_load() or [[1.0] * self.spec.num_experts for _ in self.spec.moe_layers]

    def _scale(self, num_workers: int, on_phase: PhaseReport) -> ChangeReport:
        assert self.controller is not None
        before = len(self.controller.topology.workers) if self.controller.topology else 0
        direction = "up" if num_workers > before else "down" if num_workers < before else "rebalance"
        # the initial placement at start-up is not a scale event
        return self._recorded(direction, before > 0, lambda: self.controller.scale(num_workers, on_phase))

    def _recorded(self, direction: str, event: bool, change: Callable[[], ChangeReport]) -> ChangeReport:
        try:
            report = change()
        except Exception as exc:
            if event and not isinstance(exc, (ScaleRejected, ValueError)):
                self.metrics.scale_event(direction, "aborted")
            raise
        if event:
            self.metrics.scale_event(report.direction, "committed", report.seconds)
        for path, n in (("remap", report.bytes_remapped), ("peer", report.bytes_copied), ("disk", report.bytes_loaded)):
            if n:
                self.metrics.bytes_moved(path, n)
        if self.config.standby and event:
            threading.Thread(target=self._refill_standby, name="standby", daemon=True).start()
        return report

    def _start_rebalancer(self) -> None:
        c, ctl = self.config, self.controller
        # the hysteresis band: 0.1 of imbalance, narrower for a threshold closer to 1
        band = min(0.1, (c.rebalance_threshold - 1) / 2) if c.rebalance_threshold else 0.1
        rule = RebalanceRule(c.rebalance_threshold, band, c.rebalance_interval_s)
        self.rebalancer = Rebalancer(
            self.stats.load_window, rule, lambda: ctl.topology,
            lambda load: plan_rebalance(ctl.topology, load, ctl.slots, ctl.replicate_hot, ctl.redundant_experts,
                                        ctl.share_node),
            lambda load: self.rebalance(load=load).report, self.metrics.expert_load_imbalance)
        self.rebalancer.start()

    def _refill_standby(self) -> None:
        """Start standby workers again, a while after a change: a process start takes a core for
        about a second, which streams would feel right after a change on a small machine."""
        if not self._stopping.wait(self.config.standby_refill_delay_s):
            self.controller.fill_standby()

    def _start_grpc(self) -> None:
        c = self.config
        prompts = PromptEncoder(self.tokenizer, self.engine.max_model_len)
        inference = InferenceServicer(self.engine, prompts, self.stats, WriteDeadline(
            c.stream_write_timeout_s, lambda: self.metrics.stream_write_timeout("grpc")), c.stream_interval)
        admin = AdminServicer(self.controller, self, self.operations.registry)
        self.front = GrpcFront(c, inference, admin)
        bound = self.front.start()
        self.port, self.admin_address = bound.port, bound.admin_address

    def _start_http(self) -> None:
        c = self.config
        # the same prompt rules as gRPC (server/api/prompts.py: size bound, then tokenizing)
        api = HttpApi(self.engine, PromptEncoder(self.tokenizer, self.engine.max_model_len).encode, self.stats, c.model,
                      load_chat_template(c.model), WriteDeadline(
                          c.stream_write_timeout_s, lambda: self.metrics.stream_write_timeout("http")),
                      api_key=c.api_key, stream_interval=c.stream_interval)
        self.http = HttpFront(api, c.host, c.http_port)
        self.http_port = self.http.port
        self.http.start()

    def _start_autoscaler(self, path: str) -> None:
        from server.autoscale.wiring import start_autoscaler
        self.autoscaler = start_autoscaler(self, path)

    def drain(self, grace_s: float) -> bool:
        """Stop intake (new requests: UNAVAILABLE; health NOT_SERVING) and let the requests taken
        finish, for at most `grace_s` seconds. True when every one finished; shutdown() then ends
        the rest (UNAVAILABLE "server shutting down")."""
        if self.engine is None:
            return True
        if self.http is not None:   # first: a request HTTP takes in between would meet a closed intake
            self.http.set_serving(False)
        self.engine.close_intake()
        if self.front is not None:
            self.front.not_serving()
        deadline = time.monotonic() + grace_s
        while not self.engine.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.engine.idle

    def shutdown(self) -> None:
        """Stop taking requests, end streams, stop workers and Ray; leave no shared memory behind."""
        self._stopping.set()
        if self.autoscaler is not None:
            self.autoscaler.stop()
        if self.rebalancer is not None:
            self.rebalancer.stop()
        if self.engine is not None:
            # intake first, so nothing reaches an engine that has stopped; the streams still
            # open then end with UNAVAILABLE "server shutting down", which the grace flushes
            self.engine.close_intake()
            self.engine.stop()
        if self.front is not None:
            self.front.stop(grace=2)
        if self.http is not None:
            self.http.stop()
        # a failover or restore in flight may be starting a Ray actor: Ray must not be shut down
        # under a thread inside it (seen as a segfault at the end of a test session)
        if self.failover is not None and not self.failover.join(timeout=60):
            log.warning("a failover change is still running; stopping the workers under it")
        if self.controller is not None:
            self.controller.shutdown()
        unlink_namespace(self.namespace)
        disown_namespace(self.namespace)
        self.metrics.stop()
        if self.started_ray:
            import ray
            ray.shutdown()
        self._ray_down.set()
