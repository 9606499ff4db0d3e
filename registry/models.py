"""What the registry is: server instances, workers, and each worker's connections."""

from __future__ import annotations

from datetime import datetime

from django.core.validators import RegexValidator
from django.db import models

from registry import protocol


class ServerInstanceQuerySet(models.QuerySet["ServerInstance"]):
    def running(self) -> ServerInstanceQuerySet:
        return self.filter(stopped_at__isnull=True)

    def silent_since(self, before: datetime) -> ServerInstanceQuerySet:
        """Running instances whose last heartbeat is older than `before`: presumed dead."""
        return self.running().filter(heartbeat_at__lt=before)


class ServerInstance(models.Model):
    """One boot of one daphne process. A restart is a new row under the same name."""

    id = models.CharField(primary_key=True, max_length=32)
    name = models.CharField(max_length=200, db_index=True)
    hostname = models.CharField(max_length=200)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField(db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    stop_reason = models.CharField(max_length=200, blank=True)

    objects = ServerInstanceQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.id[:8]})"


class WorkerStatus(models.TextChoices):
    CONNECTED = "connected", "connected"
    DISCONNECTED = "disconnected", "disconnected"


class WorkerQuerySet(models.QuerySet["Worker"]):
    def connected(self) -> WorkerQuerySet:
        return self.filter(status=WorkerStatus.CONNECTED)

    def held_by(self, instance_id: str) -> WorkerQuerySet:
        return self.connected().filter(current_connection__instance_id=instance_id)


class Worker(models.Model):
    """A worker id and what the service knows of it; observed fields are the service's alone."""

    id = models.CharField(
        primary_key=True,
        max_length=protocol.WORKER_ID_MAX_LENGTH,
        validators=[RegexValidator(rf"\A{protocol.WORKER_ID_PATTERN}\Z")],
        verbose_name="worker id",
    )
    status = models.CharField(
        max_length=16,
        choices=WorkerStatus.choices,
        default=WorkerStatus.DISCONNECTED,
        db_index=True,
    )
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    observed_ip = models.GenericIPAddressField(null=True, blank=True, unpack_ipv4=True)
    observed_port = models.PositiveIntegerField(null=True, blank=True)
    public_ip = models.GenericIPAddressField(
        null=True, blank=True, unpack_ipv4=True, help_text="The address the worker reported."
    )
    public_ip_reported_at = models.DateTimeField(null=True, blank=True)
    agent_info = models.JSONField(default=dict, blank=True)
    current_connection = models.OneToOneField(
        "Connection", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = WorkerQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status="disconnected")
                | models.Q(current_connection__isnull=False),
                name="connected_worker_has_a_connection",
            ),
        ]

    def __str__(self) -> str:
        return self.id

    @property
    def is_connected(self) -> bool:
        return self.status == WorkerStatus.CONNECTED


class ConnectionQuerySet(models.QuerySet["Connection"]):
    def open(self) -> ConnectionQuerySet:
        return self.filter(closed_at__isnull=True)

    def held_by(self, instance_id: str) -> ConnectionQuerySet:
        return self.open().filter(instance_id=instance_id)


class Connection(models.Model):
    """One WebSocket session of a worker, handshake to close. Reconnects never delete rows."""

    worker = models.ForeignKey(Worker, on_delete=models.CASCADE, related_name="connections")
    instance = models.ForeignKey(
        ServerInstance, null=True, on_delete=models.SET_NULL, related_name="connections"
    )
    channel_name = models.CharField(max_length=200)
    opened_at = models.DateTimeField(db_index=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    close_code = models.PositiveIntegerField(null=True, blank=True)
    close_reason = models.CharField(max_length=200, blank=True)
    observed_ip = models.GenericIPAddressField(null=True, blank=True, unpack_ipv4=True)
    observed_port = models.PositiveIntegerField(null=True, blank=True)
    public_ip = models.GenericIPAddressField(
        null=True, blank=True, unpack_ipv4=True, help_text="Reported during this connection."
    )

    objects = ConnectionQuerySet.as_manager()

    class Meta:
        ordering = ["-opened_at", "-id"]
        indexes = [
            models.Index(fields=["worker", "-opened_at"], name="connection_worker_recent"),
            models.Index(fields=["instance", "closed_at"], name="connection_instance_open"),
        ]

    def __str__(self) -> str:
        return f"{self.worker_id} #{self.pk}"

    @property
    def is_open(self) -> bool:
        return self.closed_at is None
