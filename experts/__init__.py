"""The model and its experts.

- `model/`     the decoder the engine runs (embeddings, attention, norms, router, LM head), the
               checkpoint reader, the normalised config (`spec.py`), the dtype table, demo checkpoints.
- `kernels/`   the compute of routed experts: the pure-torch reference and the fast kernels.
- `wire/`      every internal connection: framing and bounds, the engine<->worker data plane, the
               worker<->worker peer transfer.
- `worker/`    the expert worker (a Ray actor): its verbs, its slot pool, its data-plane server.
- `placement/` the placement planner, a pure function (no torch, no ray).
"""
