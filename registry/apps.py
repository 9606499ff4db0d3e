from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Rendezvous registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db import transaction
        from django.db.models.signals import post_delete, post_save

        from registry import checks  # noqa: F401  (registers the system checks)
        from registry.models import PeerRule

        def rules_changed(**_: object) -> None:
            from registry.runtime import notify_policy_changed

            # Once the change is committed: the instances read the rules at once.
            transaction.on_commit(notify_policy_changed)

        post_save.connect(rules_changed, sender=PeerRule, dispatch_uid="peer-rules-saved")
        post_delete.connect(rules_changed, sender=PeerRule, dispatch_uid="peer-rules-deleted")
