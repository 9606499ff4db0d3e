"""The registry in the Django admin, one module per page family: workers (with their
connections and server instances), peer connections, the peer rules and their pair check, and
the secrets (enrolment keys, API tokens); `display` holds what they show values with.

Django's autodiscover imports this package; importing each module here registers its classes.
Nothing else imports the admin modules.
"""

from registry.admin import peer_rules, security, workers

__all__ = ["peer_rules", "security", "workers"]
