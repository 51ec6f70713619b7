"""Autoscaling: the policy (`policy.py`, a pure function of a metrics snapshot), the thread that
applies it (`runner.py`), the sliding windows it reads (`windows.py`) and its wiring into the
server (`wiring.py`)."""
