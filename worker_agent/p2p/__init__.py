"""Peer-to-peer connections: ICE (aioice), the service relay, TURN, and one path that moves.

One module per layer: `loop` (the asyncio thread everything here runs on), `relay` (datagrams
through the service over the agent's WebSocket), `ice` (aioice attempts: LAN and direct, or
TURN), `netcheck` (the NAT report), `path` (`PeerPath`: the best live route, changing
underneath), `session` (one introduction: which attempts run when). `ice`, `netcheck` and
`session` need the `p2p` extra (aioice); the rest is standard library.
"""
