"""Every internal connection: `dataplane.py` (engine <-> worker, one exchange per MoE layer) and
`transfer.py` (worker <-> worker peer copy of expert bytes)."""
