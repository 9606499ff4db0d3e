"""Port mapping: asking the home router to forward a UDP port to the agent, so a peer can reach
it directly even behind an endpoint-dependent ("symmetric") NAT.

`natpmp` (RFC 6886) and `pcp` (RFC 6887) are small messages written here; `upnp` (UPnP IGD)
uses async-upnp-client; `exchange` is their UDP request and retransmission; `manager`
(`PortMapper`) probes the gateway and holds the mappings; `candidate` turns a mapping into an
ICE candidate; `holder` gives the agent one mapper, made on first use (standard library only at
import, like the rest of the agent above `paths/`).
"""
