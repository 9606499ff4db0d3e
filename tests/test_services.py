"""Registry writes as plain functions: what a registration means, without a socket."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import IntegrityError
from django.utils import timezone

from registry.core import protocol
from registry.models import Connection, ServerInstance, Worker, WorkerStatus
from registry.presence import instances, reports, sessions

pytestmark = pytest.mark.django_db


def start(instance_id: str = "a" * 32, name: str = "host:1", now=None, dead=True) -> str:
    instances.start_instance(
        instance_id=instance_id,
        name=name,
        hostname="host",
        pid=1,
        now=now,
        is_dead=lambda other: dead,
    )
    return instance_id


def register(worker_id: str, instance_id: str, channel: str = "chan", now=None, ip="192.0.2.1"):
    return sessions.register_connection(
        worker_id=worker_id,
        channel_name=channel,
        instance_id=instance_id,
        observed_ip=ip,
        observed_port=40000,
        now=now,
    )


def test_first_registration_creates_the_worker_and_its_first_connection() -> None:
    instance = start()
    registration = register("w1", instance)
    worker = Worker.objects.get(id="w1")
    assert worker.status == WorkerStatus.CONNECTED
    assert worker.current_connection_id == registration.connection_id
    assert (worker.observed_ip, worker.observed_port) == ("192.0.2.1", 40000)
    assert registration.superseded_channel is None
    assert Connection.objects.get().instance_id == instance


def test_second_connection_supersedes_the_first_and_keeps_its_history() -> None:
    instance = start()
    first = register("w1", instance, channel="old")
    second = register("w1", instance, channel="new", ip="192.0.2.2")
    assert second.superseded_connection_id == first.connection_id
    assert second.superseded_channel == "old"
    old = Connection.objects.get(pk=first.connection_id)
    assert old.close_code == protocol.CloseCode.SUPERSEDED and old.closed_at is not None
    worker = Worker.objects.get(id="w1")
    assert worker.current_connection_id == second.connection_id
    assert worker.observed_ip == "192.0.2.2"
    assert Connection.objects.filter(worker_id="w1").count() == 2


def test_closing_a_superseded_connection_leaves_the_newer_one_registered() -> None:
    instance = start()
    first = register("w1", instance)
    second = register("w1", instance)
    ended = sessions.close_connection(connection_id=first.connection_id, code=4000, reason="x")
    assert ended is False
    worker = Worker.objects.get(id="w1")
    assert worker.status == WorkerStatus.CONNECTED
    assert worker.current_connection_id == second.connection_id
    # The first recorded ending stands.
    assert Connection.objects.get(pk=first.connection_id).close_reason == "superseded"


def test_closing_the_current_connection_ends_the_registration() -> None:
    instance = start()
    registration = register("w1", instance)
    assert sessions.close_connection(
        connection_id=registration.connection_id, code=1000, reason="bye"
    )
    worker = Worker.objects.get(id="w1")
    assert worker.status == WorkerStatus.DISCONNECTED and worker.current_connection is None
    connection = Connection.objects.get()
    assert (connection.close_code, connection.close_reason) == (1000, "bye")


def test_reported_address_is_kept_only_from_the_current_connection() -> None:
    instance = start()
    first = register("w1", instance)
    register("w1", instance)
    assert not reports.report_public_ip(connection_id=first.connection_id, ip="198.51.100.9")
    assert Worker.objects.get(id="w1").public_ip is None


def test_reported_address_is_normalised_and_recorded_on_worker_and_connection() -> None:
    instance = start()
    registration = register("w1", instance)
    assert reports.report_public_ip(connection_id=registration.connection_id, ip="2001:DB8::1")
    assert Worker.objects.get(id="w1").public_ip == "2001:db8::1"
    assert Connection.objects.get().public_ip == "2001:db8::1"


def test_two_addresses_from_one_connection_in_one_batch_the_last_wins() -> None:
    instance = start()
    connection_id = register("w1", instance).connection_id
    stored = reports.record_reports(
        [
            reports.Report(connection_id, public_ip="198.51.100.1"),
            reports.Report(connection_id, agent_info={"version": "1"}),
            reports.Report(connection_id, public_ip="198.51.100.2"),
        ]
    )
    assert stored == [True, True, True]
    worker = Worker.objects.get(id="w1")
    assert (worker.public_ip, worker.agent_info) == ("198.51.100.2", {"version": "1"})
    assert Connection.objects.get().public_ip == "198.51.100.2"


def test_a_batch_stores_the_current_connections_reports_and_ignores_a_superseded_ones() -> None:
    instance = start()
    old = register("w1", instance).connection_id
    new = register("w1", instance).connection_id
    other = register("w2", instance).connection_id
    nat = protocol.NatReport(
        mapping=protocol.NatMapping.ENDPOINT_INDEPENDENT,
        udp_endpoint=protocol.UdpEndpoint(ip="203.0.113.5", port=40000),
    )
    stored = reports.record_reports(
        [
            reports.Report(old, public_ip="198.51.100.66", agent_info={"stale": True}),
            reports.Report(new, nat=nat),
            reports.Report(other, public_ip="2001:db8::7"),
            reports.Report(new, agent_info={"version": "2"}),
        ]
    )
    assert stored == [False, True, True, True]
    w1, w2 = Worker.objects.order_by("id")
    assert (w1.public_ip, w1.agent_info) == (None, {"version": "2"})
    assert (w1.nat_mapping, w1.udp_ip, w1.udp_port) == (
        "endpoint-independent",
        "203.0.113.5",
        40000,
    )
    assert w2.public_ip == "2001:db8::7" and w2.public_ip_reported_at is not None
    assert Connection.objects.get(id=old).public_ip is None


def test_a_nat_report_with_a_port_mapping_stores_it_and_a_new_registration_clears_it() -> None:
    instance = start()
    first = register("w1", instance).connection_id
    mapped = protocol.parse_client_message(
        '{"type": "nat_report", "mapping": "endpoint-dependent", "udp_endpoint": null,'
        ' "port_mapping": {"protocol": "nat-pmp", "external": {"ip": "198.20.0.1", "port": 41000}}}'
    )
    assert isinstance(mapped, protocol.NatReport)
    assert reports.record_nat_report(connection_id=first, report=mapped)
    worker = Worker.objects.get(id="w1")
    assert (worker.port_mapping_protocol, worker.port_mapping_ip, worker.port_mapping_port) == (
        "nat-pmp",
        "198.20.0.1",
        41000,
    )
    from registry.presence.selectors import worker_detail

    nat = worker_detail("w1")["nat"]  # type: ignore[index]
    assert nat["port_mapping"] == {
        "protocol": "nat-pmp",
        "external": {"ip": "198.20.0.1", "port": 41000},
    }
    register("w1", instance)  # another network, maybe: its own report will say
    assert Worker.objects.get(id="w1").port_mapping_protocol == ""


@pytest.mark.parametrize(
    "port_mapping",
    [
        '{"protocol": "igd2", "external": {"ip": "198.20.0.1", "port": 1}}',
        '{"protocol": "pcp"}',
        '{"protocol": "pcp", "external": {"ip": "not an ip", "port": 1}}',
        '"nat-pmp"',
    ],
)
def test_a_nat_report_with_a_bad_port_mapping_is_refused_with_the_field_named(
    port_mapping: str,
) -> None:
    frame = f'{{"type": "nat_report", "mapping": "unknown", "port_mapping": {port_mapping}}}'
    with pytest.raises((protocol.InvalidField, protocol.InvalidIp)):
        protocol.parse_client_message(frame)


def test_a_malformed_address_never_reaches_the_database() -> None:
    instance = start()
    registration = register("w1", instance)
    with pytest.raises(protocol.InvalidIp):
        reports.report_public_ip(connection_id=registration.connection_id, ip="evil")
    assert Worker.objects.get(id="w1").public_ip is None


def test_a_connected_worker_without_a_connection_is_refused_by_the_database() -> None:
    now = timezone.now()
    with pytest.raises(IntegrityError):
        Worker.objects.create(id="w", status=WorkerStatus.CONNECTED, first_seen=now, last_seen=now)


def test_restart_under_the_same_name_closes_what_the_earlier_boot_left_open() -> None:
    old = start("a" * 32, name="host:8000")
    register("w1", old)
    start("b" * 32, name="host:8000")
    worker = Worker.objects.get(id="w1")
    assert worker.status == WorkerStatus.DISCONNECTED
    connection = Connection.objects.get()
    assert connection.close_reason == protocol.REASON_INSTANCE_RESTARTED
    assert ServerInstance.objects.get(id=old).stopped_at is not None


def test_a_live_instance_sharing_the_name_is_left_alone() -> None:
    # Regression: two live instances named alike closed each other's sessions every round.
    first = start("a" * 32, name="host:8000")
    register("w1", first)
    start("b" * 32, name="host:8000", dead=False)
    assert Worker.objects.get(id="w1").status == WorkerStatus.CONNECTED
    assert ServerInstance.objects.get(id=first).stopped_at is None


def test_no_connection_is_recorded_on_a_stopped_instance() -> None:
    instance = start()
    instances.stop_instance(instance_id=instance, reason="swept")
    with pytest.raises(sessions.InstanceStopped):
        register("late", instance)
    assert not Connection.objects.exists()


def test_rows_left_open_on_a_stopped_instance_are_closed_by_the_backstop() -> None:
    instance = start()
    register("w1", instance)
    ServerInstance.objects.filter(id=instance).update(stopped_at=timezone.now())  # a lost race
    assert instances.close_connections_of_stopped_instances() == 1
    assert Worker.objects.get(id="w1").status == WorkerStatus.DISCONNECTED


def test_restart_under_another_name_leaves_other_instances_alone() -> None:
    other = start("a" * 32, name="host:8000")
    register("w1", other)
    start("b" * 32, name="host:8001")
    assert Worker.objects.get(id="w1").status == WorkerStatus.CONNECTED


def test_silent_instance_is_swept_after_the_staleness_bound() -> None:
    t0 = timezone.now()
    dead = start("a" * 32, name="dead", now=t0)
    alive = start("b" * 32, name="alive", now=t0)
    register("w-dead", dead, now=t0)
    register("w-alive", alive, now=t0)
    later = t0 + timedelta(seconds=31)
    instances.heartbeat_instance(instance_id=alive, now=later)
    closed = instances.sweep_silent_instances(
        dead_after=timedelta(seconds=30), now=later, exclude=alive
    )
    assert closed == 1
    assert Worker.objects.get(id="w-dead").status == WorkerStatus.DISCONNECTED
    assert Worker.objects.get(id="w-alive").status == WorkerStatus.CONNECTED
    swept = Connection.objects.get(worker_id="w-dead")
    assert (swept.close_code, swept.close_reason) == (1006, protocol.REASON_INSTANCE_LOST)
    # The swept worker was last seen when its instance last spoke, not at the sweep.
    assert Worker.objects.get(id="w-dead").last_seen == t0


def test_an_instance_that_heartbeats_within_the_bound_is_not_swept() -> None:
    t0 = timezone.now()
    other = start("a" * 32, name="other", now=t0)
    register("w1", other, now=t0)
    instances.heartbeat_instance(instance_id=other, now=t0 + timedelta(seconds=25))
    closed = instances.sweep_silent_instances(
        dead_after=timedelta(seconds=30), now=t0 + timedelta(seconds=40)
    )
    assert closed == 0
    assert Worker.objects.get(id="w1").status == WorkerStatus.CONNECTED


def test_a_swept_instance_learns_it_at_its_next_heartbeat() -> None:
    t0 = timezone.now()
    instance = start(now=t0)
    instances.sweep_silent_instances(
        dead_after=timedelta(seconds=30), now=t0 + timedelta(seconds=60)
    )
    assert instances.heartbeat_instance(instance_id=instance) is False


def test_a_second_stop_of_the_same_instance_closes_nothing_again() -> None:
    instance = start()
    register("w1", instance)
    assert instances.stop_instance(instance_id=instance, reason="a") == 1
    assert instances.stop_instance(instance_id=instance, reason="b") == 0
    assert Connection.objects.get().close_reason == "a"


def test_touch_refreshes_last_seen_of_held_workers_in_one_bounded_write() -> None:
    t0 = timezone.now()
    instance = start(now=t0)
    for n in range(5):
        register(f"w{n}", instance, now=t0)
    resolution = timedelta(seconds=10)
    assert (
        instances.touch_held_workers(
            instance_id=instance, now=t0 + timedelta(seconds=5), resolution=resolution
        )
        == 0
    )
    later = t0 + timedelta(seconds=11)
    assert instances.touch_held_workers(instance_id=instance, now=later, resolution=resolution) == 5
    assert set(Worker.objects.values_list("last_seen", flat=True)) == {later}


def test_reconcile_closes_rows_without_a_socket_and_reports_sockets_without_a_row() -> None:
    t0 = timezone.now()
    instance = start(now=t0)
    orphan = register("orphan", instance, now=t0)
    live = register("live", instance, now=t0)
    superseded = register("moved", instance, now=t0)
    register("moved", instance, now=t0)  # closes `superseded`'s row
    held = {live.connection_id, superseded.connection_id}
    result = instances.reconcile_instance(
        instance_id=instance,
        local_ids=held,
        settled_ids=held,
        grace=timedelta(seconds=10),
        now=t0 + timedelta(seconds=20),
    )
    assert result.orphans_closed == 2  # "orphan", and the newer "moved" row: no socket for either
    assert Worker.objects.get(id="orphan").status == WorkerStatus.DISCONNECTED
    assert Worker.objects.get(id="live").status == WorkerStatus.CONNECTED
    assert result.closed_elsewhere == {superseded.connection_id: protocol.CloseCode.SUPERSEDED}
    assert orphan.connection_id not in result.closed_elsewhere


def test_a_socket_attached_just_after_its_row_was_written_is_no_orphan() -> None:
    # Regression: under load a row is written a little before its socket is held; at the grace
    # boundary the row was old enough to be an orphan while the socket was too young to count.
    t0 = timezone.now()
    instance = start(now=t0)
    row = register("busy", instance, now=t0)
    result = instances.reconcile_instance(
        instance_id=instance,
        local_ids={row.connection_id},
        settled_ids=set(),  # attached a few milliseconds after t0: not settled yet
        grace=timedelta(seconds=10),
        now=t0 + timedelta(seconds=10, milliseconds=5),
    )
    assert result.orphans_closed == 0
    assert Worker.objects.get(id="busy").status == WorkerStatus.CONNECTED


def test_reconcile_leaves_young_rows_alone() -> None:
    t0 = timezone.now()
    instance = start(now=t0)
    register("young", instance, now=t0)
    result = instances.reconcile_instance(
        instance_id=instance,
        local_ids=set(),
        settled_ids=set(),
        grace=timedelta(seconds=10),
        now=t0 + timedelta(seconds=2),
    )
    assert result.orphans_closed == 0
    assert Worker.objects.get(id="young").status == WorkerStatus.CONNECTED
