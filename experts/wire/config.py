"""What the server hands each worker about its internal connections, through Ray at actor start."""
from __future__ import annotations

from dataclasses import dataclass

from experts.wire.auth import ServerSecret

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class WireConfig:
    secret: ServerSecret              # every data-plane, ring and transfer connection proves it holds this
    max_step_tokens: int = 512        # the engine's step budget: bounds the pairs of one exchange
    # where workers listen: loopback for a server on one node; None = the worker's Ray node address,
    # only when the server was told to span nodes (a joined cluster)
    bind_host: str | None = LOOPBACK

    def __post_init__(self) -> None:
        if self.max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {self.max_step_tokens!r}")
        if self.bind_host is not None and not self.bind_host:
            raise ValueError(f"bind_host must be an address or None, got {self.bind_host!r}")

    @staticmethod
    def generate(max_step_tokens: int = 512, bind_host: str | None = LOOPBACK) -> WireConfig:
        """A fresh secret for a server that starts."""
        return WireConfig(ServerSecret.generate(), max_step_tokens, bind_host)
