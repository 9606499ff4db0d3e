"""Who may do what: which mode the service runs in, how a worker id is enrolled and proves
itself (enrolment keys, credentials), the certificates workers are known by, bans, who may read
the registry over HTTP (API tokens) and which browser pages may open a worker socket.

Parsing a certificate is core/certificates.py (no Django); the Origin check is here, not in core,
because it uses Django's host validation.
"""
