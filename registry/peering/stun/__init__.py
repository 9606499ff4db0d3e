"""The STUN responder workers ask for their public UDP endpoint: messages.py (the messages),
responder.py (the UDP listeners); `python -m registry.peering.stun` runs it without Django."""
