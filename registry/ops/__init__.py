"""Running and watching the service: the JSON views, `/metrics`, log lines, system checks, the
admin's overview, operator commands to live connections, and the server pieces the settings pick
(the channel layers, daphne's WebSocket server). What an operator reads or runs starts here.

The channel layers live here rather than in presence/: the settings choose them, and presence
and peering both run on them.
"""
