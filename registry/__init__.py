"""The Rendezvous service: the Django app `registry`.

Django's own files stay at the top (apps.py, models.py, routing.py, management/, migrations/,
templates/); everything else lives in a package named for its concern:

- core/      no Django: the wire protocol, the peer policy's rules and decisions, secrets, TURN
             credentials, rate limits, addresses, certificates
- presence/  one worker's WebSocket session: the consumer, the instance runtime, housekeeping,
             the writes and reads around a session
- security/  the security modes, enrolment and credentials, identities, bans, API access, Origin
- peering/   workers reaching each other: introductions, the relay, the peer rules, peer events,
             peer-connection records, the STUN responder
- admin/     the Django admin pages
- ops/       the JSON views, /metrics, logs, system checks, operator commands, channel layers
"""
