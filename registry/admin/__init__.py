"""The registry in the Django admin, one module per page family: workers, their connections and
the server instances that hold them, peer connections, the peer rules and their pair check, and
the secrets (enrolment keys, API tokens); `display` holds the helpers they show values with.

Django's autodiscover imports this package; importing each module here registers its classes.
Nothing else imports the admin modules.
"""

from registry.admin import connections, peer_connections, peer_rules, security, workers

__all__ = ["connections", "peer_connections", "peer_rules", "security", "workers"]
