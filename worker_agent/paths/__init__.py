"""Paths: datagrams to one peer over the best route that works, built on signalling.

`loop` (the asyncio thread everything here runs on), `relay` (datagrams through the service
over the agent's WebSocket), `ice` (aioice attempts: LAN and direct, or TURN), `path`
(`PeerPath`: the best live route, changing underneath), `session` (one introduction's routes:
which attempts run when), `netcheck` (the NAT report). `ice`, `netcheck` and `session` need the
`p2p` extra (aioice); the rest is standard library.
"""
