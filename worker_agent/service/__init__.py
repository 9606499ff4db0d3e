"""The session with the service: one WebSocket kept up, the lowest layer of the agent.

`session` (connect, read, reconnect, the agent's state), `attempt` (one connection attempt and
what its callbacks saw), `enrolment` (the credential and the headers it puts on a handshake),
`reporting` (agent info, public address and heartbeats once registered), `reconnect` and
`backoff` (when to try again), `credentials` (the identity file), `public_ip` (the IP echo).
Standard library and websocket-client only.
"""
