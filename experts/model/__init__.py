"""The decoder the engine runs, without the routed experts: `decoder.py` (the layers and the
expert backend contract), `attention.py` (paged attention, rotary), `spec.py` (a checkpoint's
config, normalised), `checkpoint.py` (safetensors reading), `dtypes.py`, `demo.py` (random-weight
checkpoints in each family's real format), `profile.py` (step phase timings)."""
