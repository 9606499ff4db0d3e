"""The peer API: what two agents offer each other on an encrypted connection, as Tailscale's
peerapi does: round trips (`ping`), TCP forwarding to what an operator exposed, pipes, and files.

Each stream a peer opens for it starts with a header (`header.py`) that says what the stream is
for; the answering agent replies on the same stream, with a coded refusal when it will not, and
then the bytes flow. `router.py` decides who takes an incoming stream (the peer API, or the
host program's `on_peer`), `pool.py` keeps the connections this agent opened for commands, and
`peer_api.py` puts them together for `WorkerAgent` and the command line.
"""
