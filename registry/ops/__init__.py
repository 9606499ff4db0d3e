"""Running and watching the service: the JSON views, `/metrics`, log lines, system checks,
operator commands to live connections, and the server pieces the settings pick (the channel
layers, daphne's WebSocket server). What an operator reads or runs starts here.
"""
