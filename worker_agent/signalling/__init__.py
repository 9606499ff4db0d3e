"""Signalling: what the agent and the service say about peers, over the service session.

`requests` (a frame sent, its reply awaited under a request id) and `introductions` (connect
requests, answering an introduction request, and each introduction's frames handed to whoever
carries it). Built on the service session's `send`; standard library only.
"""
