"""Reading tensors from a Hugging Face safetensors checkpoint, memory-mapped, one tensor at a time.

The engine reads only the non-expert weights; each worker reads only the experts it hosts. Nothing
reads the whole model at once.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from experts.model.spec import ModelSpec

# per family: the MoE block's module path and the names of an expert's three matrices
_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


def moe_prefix(spec: ModelSpec, layer: int) -> str:
    return f"model.layers.{layer}.{_EXPERT_NAMES[spec.family][0]}"


def expert_tensor_names(spec: ModelSpec, layer: int, expert: int) -> tuple[str, str, str]:
    """Names of (gate [I, D], up [I, D], down [D, I]) of one logical expert."""
    gate, up, down = _EXPERT_NAMES[spec.family][1]
    base = f"{moe_prefix(spec, layer)}.experts.{expert}"
    return f"{base}.{gate}.weight", f"{base}.{up}.weight", f"{base}.{down}.weight"


def is_expert_tensor(name: str) -> bool:
    return ".experts." in name


class Checkpoint:
    """An index from tensor name to the safetensors file holding it; files opened lazily (mmap)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {name: self.dir / f for name, f in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{model_dir}: no *.safetensors files")
            self._where = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    for name in h.keys():
                        self._where[name] = f
        self._handles: dict[Path, object] = {}

    def tensor(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise ValueError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(path, "pt")
        return handle.get_tensor(name)  # type: ignore[attr-defined]

    def expert(self, spec: ModelSpec, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, D], up [I, D], down [D, I]) of one logical expert, in the checkpoint's dtype."""
        gate, up, down = (self.tensor(n) for n in expert_tensor_names(spec, layer, expert))
        i, d = spec.expert_intermediate, spec.hidden
        if gate.shape != (i, d) or up.shape != (i, d) or down.shape != (d, i):
            raise ValueError(f"expert ({layer}, {expert}): shapes {tuple(gate.shape)}, {tuple(up.shape)}, "
                             f"{tuple(down.shape)} do not match config (I={i}, D={d})")
        return gate, up, down

    def dense_state(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every non-expert tensor (the engine's share), cast to `dtype`."""
        return {n: self.tensor(n).to(dtype) for n in self._where if not is_expert_tensor(n)}

    def close(self) -> None:
        self._handles.clear()
