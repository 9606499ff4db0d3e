"""One worker's WebSocket session and the registry around it: the consumer, this process as a
server instance (the sockets it holds, its command channel, housekeeping), the writes a session
makes (registration, close, reports, instance rows) and the reads of workers, batched.
"""
