"""The local control socket: the running agent serves it (`server.py`), the command line talks
to it (`client.py`), so that every command uses the one agent of the machine, its identity and
its connections (as tailscale talks to tailscaled). `protocol.py` says what goes over it,
`socketfile.py` where it lives and how it is made safely, `handlers.py` what each request does.
"""
