"""The server's one frozen config, built once from the command line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    model: str
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400
    http_port: int = 8000                # OpenAI-compatible HTTP API; -1 = off, 0 = any free port
    ray_address: str | None = None
    ray_num_cpus: int | None = None       # embedded Ray only
    autoscale: str | None = None          # policy YAML
    dtype: str | None = None              # None = the checkpoint's own
    kv_cache_tokens: int = 16384
    block_size: int = 32                 # KV tokens per block; 32: vLLM's "vec" attention kernels (16 runs "vec16", 10-25% slower here)
    max_waiting: int = 256
    max_running: int = 64
    max_step_tokens: int = 512            # prefill chunk budget per engine step
    max_model_len: int | None = None      # None = the model's max_position_embeddings
    standby: int = 0
    standby_refill_delay_s: float = 10.0  # a refill starts a process: not in the seconds right after a change
    worker_cpus: float = 0.5
    worker_gpus: float = 0.0
    slots_per_worker: int = 0             # 0 = as many as the model has experts per layer
    replicate_hot: bool = False
    share_node_experts: bool = True       # every worker holds its node's experts (remaps): the engine balances over them
    node_lead: bool = True                # with shared experts, one worker per node computes (with the node's CPUs),
                                          # its node-mates stand by mapped (server/engine/exchange.py)
    prepare_timeout_s: float = 300.0
    worker_timeout_s: float = 5.0         # a worker silent this long in one exchange is lost (hung)
    redundant_experts: int = 0            # extra replicas per layer (hottest experts): a loss is a reroute
    engine_threads: int = 0               # torch threads of the engine process; 0 = its CPUs but one (threads.py)
    overlap: bool = False                 # two micro-batches per step, engine and workers overlapped
    rebalance_window_s: float = 30.0      # expert load is counted over this sliding window
    rebalance_threshold: float = 0.0      # imbalance (max/mean tokens per worker) that rebalances; 0 = by hand only
    rebalance_interval_s: float = 60.0    # at least this long between two automatic rebalances
    # the front door (server/api/front.py)
    tls_cert: str | None = None           # PEM; with tls_key, every gRPC port speaks TLS
    tls_key: str | None = None
    tls_client_ca: str | None = None      # PEM; clients must present a certificate it signed (mTLS)
    admin_token: str | None = None        # Admin RPCs need `authorization: Bearer <token>`
    api_key: str | None = None            # /v1 of the HTTP API needs `Authorization: Bearer <key>`
    admin_address: str | None = None      # HOST:PORT of Admin's own server; None: beside Inference on
                                          # loopback hosts, else 127.0.0.1:port+1
    reflection: bool = True               # the schema is public (CONTRACT); grpcurl works without files
    shutdown_grace_s: float = 30.0        # SIGTERM/SIGINT: running streams get this long to finish
    max_streams_per_connection: int = 100 # HTTP/2 streams one gRPC connection may hold open at once
    stream_write_timeout_s: float = 30.0  # a stream write its client leaves unread this long ends the
                                          # stream and cancels its request
    stream_interval: int = 1              # new tokens per message of a stream that does not choose
                                          # (gRPC stream_interval 0, HTTP streams); the first goes at once

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise ValueError(f"--model {self.model!r} is not a directory")
        checks = {
            "workers": self.workers >= 1, "port": 0 <= self.port < 65536,
            "metrics_port": -1 <= self.metrics_port < 65536, "http_port": -1 <= self.http_port < 65536,
            "kv_cache_tokens": self.kv_cache_tokens >= self.block_size,
            "block_size": self.block_size >= 1, "max_waiting": self.max_waiting >= 0,
            "max_running": self.max_running >= 1, "max_step_tokens": self.max_step_tokens >= 1,
            "standby": self.standby >= 0, "worker_cpus": self.worker_cpus >= 0, "worker_gpus": self.worker_gpus >= 0,
            "slots_per_worker": self.slots_per_worker >= 0, "engine_threads": self.engine_threads >= 0,
            "prepare_timeout_s": self.prepare_timeout_s > 0, "worker_timeout_s": self.worker_timeout_s > 0,
            "redundant_experts": self.redundant_experts >= 0, "standby_refill_delay_s": self.standby_refill_delay_s >= 0,
            "rebalance_window_s": self.rebalance_window_s > 0, "rebalance_interval_s": self.rebalance_interval_s >= 0,
            "rebalance_threshold": self.rebalance_threshold == 0 or self.rebalance_threshold > 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is out of range")
        if self.max_step_tokens < self.max_running:
            # every running stream gets its decode token in every step; fewer would starve some
            raise ValueError(f"--max-step-tokens {self.max_step_tokens} must be >= --max-running {self.max_running}")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r} must be float32 or bfloat16")
        self._check_front_door()

    def _check_front_door(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"--tls-cert {self.tls_cert!r} and --tls-key {self.tls_key!r}: give both or neither")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--tls-client-ca", self.tls_client_ca)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path!r} is not a file")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"--tls-client-ca {self.tls_client_ca!r} needs --tls-cert and --tls-key")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("--admin-token must not be empty")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")
        if self.admin_address is not None:
            host, _, port = self.admin_address.rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"--admin-address {self.admin_address!r} must be HOST:PORT")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"--shutdown-grace {self.shutdown_grace_s!r} must be >= 0")
        if self.max_streams_per_connection < 1:
            raise ValueError(f"--max-streams-per-connection {self.max_streams_per_connection!r} must be >= 1")
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval {self.stream_interval!r} must be >= 1")
        if not 0 < self.stream_write_timeout_s < float("inf"):
            raise ValueError(f"--stream-write-timeout {self.stream_write_timeout_s!r} must be a number of seconds > 0")

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size
