"""Kernels for routed experts: `ffn.py` holds the pure-torch reference (`run_grouped`) and the
in-process backend built on it."""
