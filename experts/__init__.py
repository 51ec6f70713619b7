"""The model and its experts.

- `model/`     the decoder the engine runs (embeddings, attention, norms, router, LM head) as named
               phases, the expert backend contract (`backend.py`), the KV cache, the checkpoint
               reader, the normalised config (`spec.py`), the dtype table, demo checkpoints.
- `kernels/`   compute behind one door to vLLM's CPU ops (`oplib.py`): routed experts and paged
               attention, each with its pure-torch reference.
- `wire/`      every internal connection: framing and bounds, the engine<->worker data plane, the
               worker<->worker peer transfer.
- `worker/`    the expert worker (a Ray actor): its verbs, its slot pool, its data-plane server.
- `placement/` the placement planner, a pure function (no torch, no ray).
"""
