"""Placement: `planner.py`, a pure function from the current placement, the target workers and
the expert load to a new placement and its moves (no torch, no ray)."""
