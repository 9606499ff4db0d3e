"""Paths: datagrams to one peer over the best route that works, built on signalling.

`loop` (the asyncio thread everything here runs on), `relay` (datagrams through the service
over the agent's WebSocket), `ice` (aioice attempts: LAN and direct, or TURN), `path`
(`PeerPath`: the best live route, changing underneath), `session` (one introduction's routes:
which attempts run when), `netcheck` (the NAT report), `kinds` (`lan` or `direct` for a host
pair), `portmap/` (port mappings from the router: NAT-PMP, PCP, UPnP IGD), `probing` (opt-in
hard-NAT probing). `ice`, `netcheck`, `session`, `probing` and `portmap/` (but `holder`) need the
`p2p` extra (aioice, async-upnp-client); the rest is standard library.
"""
