"""Warming a worker before it serves: one exchange per MoE layer through a link of its own.

A worker's first exchange of each layer is slow (the kernel's first call sets up its code and
buffers: seconds on a loaded machine), and the serving link's per-exchange deadline
(`--worker-timeout`) would take that for a hung worker. So during **prepare**, while the old
topology still serves, each joining worker runs one row per layer through a link opened with the
prepare timeout; the serving link, opened after, only ever sees warm exchanges.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from experts.wire.dataplane import ExchangeLink


def warm_up(links: Mapping[str, ExchangeLink], experts_of: Callable[[str], Sequence[Sequence[int]]],
            num_layers: int, hidden: int, dtype: torch.dtype) -> None:
    """Run one row through each MoE layer of every worker in `links` (closed afterwards).
    experts_of(w)[l]: the experts worker w holds in layer l (the row goes to the first)."""
    x = torch.zeros((1, hidden), dtype=dtype)
    out = torch.empty((1, hidden), dtype=torch.float32)
    one, weight = np.ones(1, dtype=np.int32), np.ones(1, dtype=np.float32)
    try:
        for layer in range(num_layers):
            # every worker computes at once: the slowest first call sets the time, not their sum
            sent = []
            for w, link in links.items():
                held = experts_of(w)[layer]
                if held:
                    # as if on one node: they share its CPUs (experts/kernels/threads.py)
                    link.send(layer, x, np.array(held[:1], dtype=np.int32), one, weight, len(links))
                    sent.append(link)
            for link in sent:
                link.recv_into(layer, out)
    finally:
        for link in links.values():
            link.close()
