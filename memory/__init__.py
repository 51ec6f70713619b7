"""Memory without compute: shared expert segments (`segments.py`), a worker's slot pool
(`slots.py`) and the KV block table (`kv_blocks.py`). The slot pool and the block table are
bookkeeping: they import neither torch nor ray."""
