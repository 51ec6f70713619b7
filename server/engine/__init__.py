"""The engine: one thread that runs steps of the continuously batched model (`loop.py`), one step
through the model in one place (`step.py`), its bookkeeping (`scheduler.py`, no torch), requests
and their outputs (`request.py`), sampling, incremental detokenising, the engine process's threads
(`threads.py`), and the expert backend over the data plane (`exchange.py`)."""
