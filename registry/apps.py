from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Rendezvous registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from registry.models import PeerRule
        from registry.ops import checks  # noqa: F401  (registers the system checks)
        from registry.presence.runtime import peer_rules_changed

        post_save.connect(peer_rules_changed, sender=PeerRule, dispatch_uid="peer-rules-saved")
        post_delete.connect(peer_rules_changed, sender=PeerRule, dispatch_uid="peer-rules-deleted")
