"""The secure transport: QUIC (aioquic) over a path, between pinned worker identities.

`identity` (the worker's key pair and self-signed certificate), `quic` (`QuicSession`: one
encrypted, mutually authenticated connection over a `PeerPath`), `streams` (what arrived on a
stream and was not read yet). Needs the `p2p` extra (aioquic, cryptography).
"""
