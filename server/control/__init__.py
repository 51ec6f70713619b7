"""The control plane: the controller (`controller.py`), the single owner of the topology, runs
every change (plan, prepare, commit, release); `topology.py` holds what a change reports;
`cluster.py` is the Ray glue (start workers, read resources)."""
