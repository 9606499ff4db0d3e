"""One worker's WebSocket session and the registry around it: the consumer (on a lean consumer
base that is fair between connections, fair_consumer.py), what a handshake
becomes (handshake.py), this process as a server instance (runtime.py: its command channel;
sockets.py: the sockets it holds and their limits; housekeeping.py: its rows kept true, its end),
the writes a session makes (sessions.py, reports.py, instances.py), the reads of workers
(selectors.py), and the batching that makes thousands of them cheap (batching.py, bulk.py).
"""
