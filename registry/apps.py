from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Rendezvous registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Wires the signal receivers and the system checks, and nothing else."""
        from django.core import checks
        from django.db.models.signals import post_delete, post_save

        from registry.models import PeerRule
        from registry.ops.checks import check_rendezvous_settings
        from registry.peering.rules import rules_changed

        checks.register(check_rendezvous_settings)
        post_save.connect(rules_changed, sender=PeerRule, dispatch_uid="peer-rules-saved")
        post_delete.connect(rules_changed, sender=PeerRule, dispatch_uid="peer-rules-deleted")
