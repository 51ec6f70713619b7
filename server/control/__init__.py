"""The control plane: the controller (`controller.py`), the single owner of the topology, runs
every change (plan, prepare, commit, release); `topology.py` holds what a change reports;
`cluster.py` is the Ray glue (start workers, read resources); `operations.py` makes each change an
operation (id, phases with timings, idempotent retries, watchers); `rebalance.py` keeps the expert
load of a sliding window and rebalances by it."""
