"""What the registry is: server instances, workers and their connections, enrolment keys, API
tokens, peer connections and peer rules.

One module, longer than the others: Django finds the app's models and migrations here under the
app label `registry`, and each model keeps its invariants (constraints, querysets with names
that say what they select) beside its fields."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

from registry.core import peer_policy, protocol

# Tags are stored as ",gpu,eu-west," so that one portable `contains` finds a tag on SQLite and
# PostgreSQL alike (JSON `contains` is not supported on SQLite).
TAG_SEPARATOR = ","


TAGS_MAX_LENGTH = 1000


def encode_tags(tags: Iterable[str]) -> str:
    """Tags are case-insensitive, stored in lower case: the same match on every database."""
    clean = sorted({tag.lower() for tag in tags})
    for tag in clean:
        if not protocol.is_valid_tag(tag):
            raise ValidationError(f"{tag!r} is not a valid tag ({protocol.TAG_RULE})")
    encoded = f"{TAG_SEPARATOR}{TAG_SEPARATOR.join(clean)}{TAG_SEPARATOR}" if clean else ""
    if len(encoded) > TAGS_MAX_LENGTH:
        raise ValidationError(
            f"too many tags: {len(encoded)} characters, at most {TAGS_MAX_LENGTH}"
        )
    return encoded


def decode_tags(stored: str) -> list[str]:
    return [tag for tag in stored.split(TAG_SEPARATOR) if tag]


def tag_lookup(tag: str) -> str:
    """The `tags__contains` argument that finds exactly `tag`."""
    return f"{TAG_SEPARATOR}{tag.lower()}{TAG_SEPARATOR}"


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

    def tagged(self, tag: str) -> WorkerQuerySet:
        return self.filter(tags__contains=tag_lookup(tag))

    def within(self, reach: peer_policy.Reach) -> WorkerQuerySet:
        """The workers `reach` (core/peer_policy.py) takes in: any, or these ids and tags."""
        if reach.any:
            return self
        condition = models.Q(id__in=sorted(reach.worker_ids))
        for tag in sorted(reach.tags):
            condition |= models.Q(tags__contains=tag_lookup(tag))
        return self.filter(condition) if not reach.nobody else self.none()

    def ephemeral_gone_since(self, before: datetime) -> WorkerQuerySet:
        """Ephemeral workers offline since before `before`: due to be removed. Never a disabled
        one: removing the row would lift its ban."""
        return self.filter(
            ephemeral=True,
            status=WorkerStatus.DISCONNECTED,
            last_seen__lt=before,
            disabled_at__isnull=True,
        )


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
    observed_ip = models.GenericIPAddressField(
        null=True, blank=True, unpack_ipv4=True, verbose_name="observed IP"
    )
    observed_port = models.PositiveIntegerField(null=True, blank=True)
    public_ip = models.GenericIPAddressField(
        null=True,
        blank=True,
        unpack_ipv4=True,
        help_text="The address the worker reported.",
        verbose_name="public IP",
    )
    public_ip_reported_at = models.DateTimeField(
        null=True, blank=True, verbose_name="public IP reported at"
    )
    agent_info = models.JSONField(default=dict, blank=True)
    current_connection = models.OneToOneField(
        "Connection", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Security (docs/security.md): the credential bound to this id, and how it was enrolled.
    credential_digest = models.CharField(max_length=64, blank=True, editable=False)
    credential_prefix = models.CharField(max_length=16, blank=True, editable=False)
    credential_issued_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Set at the first frame the enrolling connection sends after its welcome: the worker has
    # its credential (informative: a worker that made its own credential needs no second try).
    credential_confirmed_at = models.DateTimeField(null=True, blank=True, editable=False)
    enrolled_with = models.ForeignKey(
        "EnrolmentKey",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="workers",
        editable=False,
    )
    tags = models.CharField(max_length=1000, blank=True, editable=False)
    # Peer connections (security/identities.py): the certificate the worker's agent made for
    # itself, pinned by its peers. Secured mode: bound at enrolment, reset by an operator.
    certificate = models.TextField(blank=True, editable=False, help_text="Base64 DER.")
    certificate_fingerprint = models.CharField(
        max_length=64, blank=True, editable=False, verbose_name="identity (SHA-256)"
    )
    certificate_bound_at = models.DateTimeField(null=True, blank=True, editable=False)
    ephemeral = models.BooleanField(
        default=False, help_text="Removed from the registry once offline for a while."
    )
    disabled_at = models.DateTimeField(null=True, blank=True, db_index=True)
    disabled_reason = models.CharField(max_length=200, blank=True)
    # NAT traversal (docs/nat-traversal.md): what the agent's STUN check found.
    nat_mapping = models.CharField(
        max_length=32,
        choices=[(m.value, m.value) for m in protocol.NatMapping],
        blank=True,
        help_text="How the worker's NAT maps its UDP socket, as the agent measured it.",
        verbose_name="NAT mapping",
    )
    udp_ip = models.GenericIPAddressField(
        null=True, blank=True, unpack_ipv4=True, verbose_name="UDP IP"
    )
    udp_port = models.PositiveIntegerField(null=True, blank=True, verbose_name="UDP port")
    nat_reported_at = models.DateTimeField(null=True, blank=True, verbose_name="NAT reported at")
    # The router's port mapping for the worker, when its router makes them (NAT-PMP, PCP, UPnP).
    port_mapping_protocol = models.CharField(
        max_length=16,
        choices=[(p.value, p.value) for p in protocol.PortMappingProtocol],
        blank=True,
        help_text="How the worker's router mapped a UDP port for it, if it did.",
        verbose_name="port mapping protocol",
    )
    port_mapping_ip = models.GenericIPAddressField(
        null=True, blank=True, unpack_ipv4=True, verbose_name="port mapping IP"
    )
    port_mapping_port = models.PositiveIntegerField(
        null=True, blank=True, verbose_name="port mapping port"
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

    @property
    def is_disabled(self) -> bool:
        return self.disabled_at is not None

    @property
    def has_credential(self) -> bool:
        return bool(self.credential_digest)

    @property
    def tag_list(self) -> list[str]:
        return decode_tags(self.tags)


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
    observed_ip = models.GenericIPAddressField(
        null=True, blank=True, unpack_ipv4=True, verbose_name="observed IP"
    )
    observed_port = models.PositiveIntegerField(null=True, blank=True)
    public_ip = models.GenericIPAddressField(
        null=True,
        blank=True,
        unpack_ipv4=True,
        help_text="Reported during this connection.",
        verbose_name="public IP",
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


class EnrolmentKeyQuerySet(models.QuerySet["EnrolmentKey"]):
    def usable(self, now: datetime) -> EnrolmentKeyQuerySet:
        """Keys that may enrol a worker now: not revoked, not expired, not a used single-use."""
        return self.filter(revoked_at__isnull=True, expires_at__gt=now).filter(
            models.Q(reusable=True) | models.Q(use_count=0)
        )


class EnrolmentKey(models.Model):
    """A pre-shared key that lets a new worker id enrol (Headscale's pre-auth keys)."""

    name = models.CharField(max_length=200, help_text="What or who the key is for.")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(
        max_length=16, editable=False, help_text="The key's first characters."
    )
    reusable = models.BooleanField(
        default=False, help_text="Enrols any number of workers; otherwise exactly one."
    )
    ephemeral = models.BooleanField(
        default=False,
        help_text="Workers enrolled with it are removed from the registry once offline for "
        "RENDEZVOUS_EPHEMERAL_AFTER seconds.",
    )
    tags = models.CharField(
        max_length=1000, blank=True, help_text="Copied onto every worker it enrols."
    )
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    use_count = models.PositiveIntegerField(default=0, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = EnrolmentKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "enrolment key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def tag_list(self) -> list[str]:
        return decode_tags(self.tags)

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        if not self.reusable and self.use_count:
            return "used"
        return "usable"


class ApiTokenQuerySet(models.QuerySet["ApiToken"]):
    def active(self) -> ApiTokenQuerySet:
        return self.filter(revoked_at__isnull=True)


class ApiToken(models.Model):
    """A bearer token for the JSON API and /metrics in secured mode (scripts, Prometheus)."""

    name = models.CharField(max_length=200, help_text="What or who the token is for.")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=16, editable=False)
    created_at = models.DateTimeField(editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class PeerConnectionOutcome(models.TextChoices):
    PENDING = "pending", "introduced, no path reported yet"
    CONNECTED = "connected", "connected"
    REFUSED = "refused", "refused"
    FAILED = "failed", "failed"


class PeerConnectionQuerySet(models.QuerySet["PeerConnection"]):
    def open(self) -> PeerConnectionQuerySet:
        """Introduced and not ended: the service still relays and signals for the pair."""
        return self.filter(
            closed_at__isnull=True,
            outcome__in=[PeerConnectionOutcome.PENDING, PeerConnectionOutcome.CONNECTED],
        )

    def involving(self, worker_id: str) -> PeerConnectionQuerySet:
        return self.filter(models.Q(requester_id=worker_id) | models.Q(target_id=worker_id))


class PeerConnection(models.Model):
    """One introduction between two workers: who asked whom, how it went, which path it took."""

    id = models.CharField(primary_key=True, max_length=32, verbose_name="introduction id")
    # Ids, not foreign keys: the record outlives a worker an operator removes.
    requester_id = models.CharField(max_length=protocol.WORKER_ID_MAX_LENGTH, db_index=True)
    target_id = models.CharField(max_length=protocol.WORKER_ID_MAX_LENGTH, db_index=True)
    requester_connection = models.ForeignKey(
        Connection, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    target_connection = models.ForeignKey(
        Connection, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_at = models.DateTimeField(db_index=True)
    outcome = models.CharField(
        max_length=16,
        choices=PeerConnectionOutcome.choices,
        default=PeerConnectionOutcome.PENDING,
        db_index=True,
    )
    failure_code = models.CharField(max_length=32, blank=True, help_text="connect_failed code.")
    detail = models.CharField(max_length=200, blank=True)
    path_kind = models.CharField(
        max_length=16,
        choices=[(k.value, k.value) for k in protocol.PathKind],
        blank=True,
        db_index=True,
        help_text="The route the pair's data takes now, as the requester's agent reported it.",
    )
    path_remote = models.CharField(max_length=64, blank=True)
    path_changed_at = models.DateTimeField(null=True, blank=True)
    path_changes = models.PositiveIntegerField(default=0)
    setup_ms = models.PositiveIntegerField(
        null=True, blank=True, help_text="From connect() to the first path, in milliseconds."
    )
    relayed_bytes = models.PositiveBigIntegerField(default=0)
    closed_at = models.DateTimeField(null=True, blank=True, db_index=True)
    close_reason = models.CharField(max_length=200, blank=True)
    decided_by = models.CharField(
        max_length=200,
        blank=True,
        help_text="What the peer policy said: the rule that allowed the pair, allow-all, or why"
        " it refused.",
    )

    objects = PeerConnectionQuerySet.as_manager()

    class Meta:
        ordering = ["-requested_at"]
        verbose_name = "peer connection"

    def __str__(self) -> str:
        return f"{self.requester_id} → {self.target_id} ({self.id[:8]})"


class PeerRule(models.Model):
    """A rule of the peer policy (registry/core/peer_policy.py): these sources may reach these
    destinations. Directional; rules only ever allow."""

    description = models.CharField(
        max_length=200, blank=True, help_text="What the rule is for, as operators will read it."
    )
    sources = models.TextField(
        help_text="Who may reach: worker ids, tag:<tag>, or * for any worker; separated by"
        " commas or spaces."
    )
    destinations = models.TextField(
        help_text="Whom they may reach: worker ids, tag:<tag>, or * for any worker."
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        verbose_name = "peer rule"

    def __str__(self) -> str:
        return f"#{self.pk}: {self.sources} -> {self.destinations}"

    def clean(self) -> None:
        errors = {}
        for field in ("sources", "destinations"):
            try:
                peer_policy.parse_side(getattr(self, field))
            except peer_policy.InvalidRule as exc:
                errors[field] = str(exc)
        if errors:
            raise ValidationError(errors)
