"""The engine: one thread that runs steps of the continuously batched model (`loop.py`), its
bookkeeping (`scheduler.py`, no torch), requests and their outputs (`request.py`), sampling,
incremental detokenising, and the expert backend over the data plane (`exchange.py`)."""
