"""What the service is made of that needs neither Django nor the rest of the project: the wire
protocol, the peer policy as plain functions over plain values, the secrets it hands out, TURN
credentials, rate limits, addresses and certificates. Nothing here imports from outside `core`,
so every other package may build on it and a test needs no database to exercise it.
"""
