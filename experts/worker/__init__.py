"""The expert worker (`actor.py`): a Ray actor that owns one device's expert pool and runs the
routed experts of the tokens the engine sends it."""
