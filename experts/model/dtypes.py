"""The one table of the dtypes we serve: the name in configs and flags -> torch dtype.

Everything that needs a torch dtype for a checkpoint's name (the engine's weights and KV cache,
a worker's segments, the demo checkpoints) and the data plane's one-byte dtype code read it here.
"""
from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# one byte on the data plane's wire; the position in this tuple is the code
WIRE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
