"""Every internal connection, one set of rules: `framing.py` (byte order, recv_exact, bounds, the
bounded acceptor), `auth.py` (the per-server secret and the mutual HMAC handshake every connection
passes before any work is read), `config.py` (what a worker is handed through Ray), `messages.py`
(the exchange's request/reply and their bounds from the model spec), `dataplane.py` (engine <->
worker over TCP, and the listener that also sets up rings), `ring.py` + `doorbell.py` (the
same-node exchange through shared memory, a futex doorbell), `transfer.py` (worker <-> worker peer
copy of expert bytes)."""
