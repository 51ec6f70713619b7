"""The serving side: everything but the experts themselves.

Rooms, lowest layer first (a room imports only from rooms above it in this list, `experts` and
`memory`):
- `engine/`    the continuously batched step loop: scheduler, requests, sampling, detokenising,
               and the expert backend that talks to the workers (`exchange.py`).
- `control/`   the controller that owns the topology and runs every change of it (plan, prepare,
               commit, release), and the Ray cluster glue that starts workers.
- `autoscale/` the autoscaling policy (pure), its runner thread and its wiring to the server.
- `api/`       the public API: gRPC servicers, the generated stubs.
- `bench/`     `elasticmoe bench ...` benchmarks, kept out of `make test`.
- `app.py` wires the rooms into one server; `cli.py` the `elasticmoe` command; `config.py` the one
  frozen config; `metrics.py` the only module that knows Prometheus.
"""
