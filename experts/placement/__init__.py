"""Placement: a pure function from the current placement, the target workers and the expert load
to a new placement and its moves (no torch, no ray).

- `planner.py` `plan_placement` (the entry, like DeepSeek EPLB's `rebalance_experts`) and `diff`
               (old vs new placement -> moves with their sources, releases).
- `pack.py`    one layer in named steps: replicate, pack, keep, assign, relieve, lift.
- `plan.py`    the data: `Placement` (phy2log), `Move`, `Plan`.
- `balance.py` the load imbalance of a placement and the rule for when to rebalance it.
"""
