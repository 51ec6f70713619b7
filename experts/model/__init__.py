"""The decoder the engine runs, without the routed experts: `decoder.py` (the layers as named
phases: embed, attention_block, route, shared_expert, dense_mlp, logits), `backend.py` (the expert
backend contract and `WorkerLost`), `local_experts.py` (the in-process reference backend),
`attention.py` (a step's attention batch, rotary, the paged-attention contract), its two kernels
`torch_attention.py` (reference) and `vllm_attention.py` (vLLM's CPU ops), `kv_cache.py` (the cache
in the chosen kernel's layout), `spec.py` (a checkpoint's config, normalised), `checkpoint.py`
(safetensors reading), `dtypes.py`, `demo.py` (random-weight checkpoints in each family's real
format), `profile.py` (step phase timings)."""
