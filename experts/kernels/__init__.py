"""Kernels: `ffn.py` holds the routed experts' pure-torch reference (`run_grouped`); `oplib.py`
is the one door to vLLM's CPU op library; `moe.py` wraps its fused MoE, `attention.py` its paged
attention, `linear.py` its oneDNN matmul for the engine's dense layers, `pointwise.py` its RMSNorm and
rotary embedding ops (float32), `threads.py` how many threads a kernel call gets (the in-process
expert backend is experts/model/local_experts.py)."""
