"""Many instances as one service: two daphne processes on PostgreSQL and Redis, no sticky
routing. Also the faults: Redis restarted, PostgreSQL unreachable for a few seconds."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets
from django.db import connection
from websockets.exceptions import ConnectionClosed

from registry.models import Connection, PeerConnection, ServerInstance, Worker, WorkerStatus
from tests.support.backing import RedisServer, TcpProxy, require_or_skip
from tests.support.databases import current_database_url
from tests.support.processes import REPO, ServerProcess, get_json, wait_until
from worker_agent import Backoff, PeerPath, WorkerAgent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres_only]


@dataclass
class Cluster:
    a: ServerProcess
    b: ServerProcess
    redis: RedisServer
    database: TcpProxy  # every instance reaches PostgreSQL through it, so a test can cut it
    balancer: TcpProxy  # round robin over a and b, as a load balancer without affinity

    def instance_of(self, server: ServerProcess) -> str:
        return ServerInstance.objects.running().get(name=server.env["RENDEZVOUS_INSTANCE_NAME"]).id


@pytest.fixture
def cluster(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[Cluster]:
    if connection.vendor != "postgresql":
        pytest.skip("multi-instance tests run on PostgreSQL: the second pass of `make test`")
    require_or_skip(shutil.which("redis-server") is not None, "redis-server is not installed")
    redis = RedisServer(tmp_path).start()
    settings = connection.settings_dict
    database = TcpProxy((settings["HOST"] or "127.0.0.1", int(settings["PORT"] or 5432)))
    proxied = current_database_url().replace(
        f"{settings['HOST'] or '127.0.0.1'}:{settings['PORT'] or 5432}",
        f"127.0.0.1:{database.port}",
    )
    env = {"REDIS_URL": redis.url}
    a = server_factory(database_url=proxied, env=env).start()
    b = server_factory(database_url=proxied, env=env).start()
    balancer = TcpProxy(("127.0.0.1", a.port), ("127.0.0.1", b.port))
    yield Cluster(a=a, b=b, redis=redis, database=database, balancer=balancer)
    for server in (a, b):
        server.kill()
    balancer.close()
    database.close()
    redis.stop()


async def open_worker(url: str, worker_id: str) -> tuple[websockets.ClientConnection, dict]:
    ws = await websockets.connect(f"{url.replace('http', 'ws')}/ws/register/{worker_id}")
    return ws, json.loads(await ws.recv())


async def closed_with(ws: websockets.ClientConnection, timeout: float) -> tuple[int | None, float]:
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    except (ConnectionClosed, TimeoutError):
        pass
    return ws.close_code, time.monotonic() - started


def listing(server: ServerProcess) -> dict:
    return get_json(f"{server.url}/debug/list_workers")[1]


def test_a_newer_connection_on_b_closes_the_older_one_on_a_at_once(cluster: Cluster) -> None:
    async def scenario() -> tuple[int | None, float, dict, dict, dict]:
        old, _ = await open_worker(cluster.a.url, "roamer")
        new, welcome = await open_worker(cluster.b.url, "roamer")
        code, took = await closed_with(old, timeout=10)
        seen_by_a = await asyncio.to_thread(listing, cluster.a)
        seen_by_b = await asyncio.to_thread(listing, cluster.b)
        await new.close()
        return code, took, welcome, seen_by_a, seen_by_b

    code, took, welcome, seen_by_a, seen_by_b = asyncio.run(scenario())
    assert code == 4000
    assert took < 2  # delivered through Redis, not left to housekeeping
    assert welcome["instance_id"] == cluster.instance_of(cluster.b)
    assert seen_by_a == seen_by_b
    assert seen_by_a["workers"]["roamer"]["public_port"] == welcome["observed_port"]
    rows = Connection.objects.filter(worker_id="roamer").order_by("id")
    assert [row.instance_id for row in rows] == [
        cluster.instance_of(cluster.a),
        cluster.instance_of(cluster.b),
    ]
    assert rows[0].close_code == 4000


def test_every_instance_serves_the_same_registry(cluster: Cluster) -> None:
    both = {cluster.instance_of(cluster.a), cluster.instance_of(cluster.b)}

    async def scenario() -> None:
        sockets = [await open_worker(cluster.balancer.url, f"w{n}") for n in range(6)]
        assert {welcome["instance_id"] for _, welcome in sockets} == both
        seen_by_a = await asyncio.to_thread(listing, cluster.a)
        assert seen_by_a == await asyncio.to_thread(listing, cluster.b)
        assert seen_by_a["connected_workers_count"] == 6
        for ws, _ in sockets:
            await ws.close()

    asyncio.run(scenario())


def test_the_disconnect_command_reaches_whichever_instance_holds_the_socket(
    cluster: Cluster,
) -> None:
    async def scenario() -> tuple[int, int | None, float]:
        ws, _ = await open_worker(cluster.a.url, "held-on-a")
        command = await asyncio.create_subprocess_exec(
            sys.executable,
            "manage.py",
            "disconnect",
            "held-on-a",
            cwd=REPO,
            env={**cluster.b.env, "RENDEZVOUS_HOUSEKEEPING": "0"},
        )
        returncode = await command.wait()
        code, took = await closed_with(ws, timeout=10)
        return returncode, code, took

    returncode, code, took = asyncio.run(scenario())
    assert returncode == 0
    assert (code, took < 2) == (4001, True)
    row = Connection.objects.get(worker_id="held-on-a")
    assert (row.close_code, row.close_reason) == (4001, "disconnected by an operator")


def test_a_killed_instance_leaves_no_ghost_and_its_agents_register_elsewhere(
    cluster: Cluster,
) -> None:
    agents = [
        WorkerAgent(
            cluster.balancer.url, f"agent-{n}", ip_echo_url="", backoff=Backoff(base=0.2, cap=1)
        )
        for n in range(4)
    ]
    try:
        for agent in agents:
            agent.start()
        assert all(agent.wait_registered(10) for agent in agents)

        async def hold_a_silent_socket_on_a() -> None:
            await open_worker(cluster.a.url, "silent")  # a client that will never reconnect

        asyncio.run(hold_a_silent_socket_on_a())
        dead = cluster.instance_of(cluster.a)
        survivor = cluster.instance_of(cluster.b)
        cluster.a.kill()
        killed_at = time.monotonic()
        # Documented bound: INSTANCE_DEAD_AFTER (4 s in tests) + HOUSEKEEPING_INTERVAL (1 s).
        wait_until(
            lambda: (
                not Worker.objects.connected().filter(current_connection__instance_id=dead).exists()
            ),
            timeout=15,
            what="no worker left on the killed instance",
        )
        assert time.monotonic() - killed_at < 4 + 1 + 2
        wait_until(
            lambda: (
                Worker.objects.connected()
                .filter(id__startswith="agent-", current_connection__instance_id=survivor)
                .count()
                == 4
            ),
            timeout=15,
            what="agents registered on the survivor",
        )
        assert Worker.objects.get(id="silent").status == WorkerStatus.DISCONNECTED
    finally:
        for agent in agents:
            agent.stop(timeout=5)


def agents_on(cluster: Cluster, count: int, prefix: str) -> list[WorkerAgent]:
    agents = [
        WorkerAgent(
            cluster.balancer.url, f"{prefix}-{n}", ip_echo_url="", backoff=Backoff(base=0.3, cap=2)
        )
        for n in range(count)
    ]
    for agent in agents:
        agent.start()
    assert all(agent.wait_registered(10) for agent in agents)
    return agents


def registry_is_consistent() -> bool:
    """No half-written state: each connected worker has exactly its current connection open."""
    connected = Worker.objects.connected()
    open_rows = Connection.objects.open()
    return (
        not connected.filter(current_connection__closed_at__isnull=False).exists()
        and open_rows.count() == connected.count()
    )


def test_redis_restart_costs_connected_workers_nothing(cluster: Cluster) -> None:
    agents = agents_on(cluster, 6, "r")

    async def supersede_across() -> tuple[int | None, float]:
        old, _ = await open_worker(cluster.a.url, "roamer")
        await asyncio.sleep(2.5)  # older than the reconciliation grace (2 housekeeping rounds)
        cluster.redis.stop()
        await open_worker(cluster.b.url, "roamer")  # registered; the 4000 cannot travel now
        return await closed_with(old, timeout=15)

    try:
        before = {agent.worker_id: agent.status()["connection_id"] for agent in agents}
        code, took = asyncio.run(supersede_across())
        # Without Redis the instance holding the old socket closes it at its next housekeeping
        # round, because the database already says it was superseded.
        assert code == 4000 and took < 5
        time.sleep(1)
        cluster.redis.start()
        time.sleep(2)
        after = {agent.worker_id: agent.status()["connection_id"] for agent in agents}
        assert after == before  # nobody was disconnected
        assert Worker.objects.connected().filter(id__startswith="r-").count() == 6
        assert registry_is_consistent()

        async def supersede_with_redis() -> tuple[int | None, float]:
            old, _ = await open_worker(cluster.a.url, "roamer-2")
            await open_worker(cluster.b.url, "roamer-2")
            return await closed_with(old, timeout=10)

        code, took = asyncio.run(supersede_with_redis())
        assert code == 4000 and took < 2  # through Redis again
    finally:
        for agent in agents:
            agent.stop(timeout=5)
    for server in (cluster.a, cluster.b):
        assert server.process.poll() is None, server.log_tail()


def test_postgres_outage_of_a_few_seconds_loses_no_worker_and_leaves_no_half_row(
    cluster: Cluster,
) -> None:
    agents = agents_on(cluster, 6, "p")
    before = {agent.worker_id: agent.status()["connection_id"] for agent in agents}
    try:
        cluster.database.cut()
        late = WorkerAgent(
            cluster.balancer.url, "p-late", ip_echo_url="", backoff=Backoff(base=0.3, cap=1)
        )
        late.start()  # arrives while the registry is unreachable
        time.sleep(3)
        assert late.status()["registered"] is False
        cluster.database.restore()
        # Connected workers never noticed: no socket of theirs needed the database meanwhile.
        assert {a.worker_id: a.status()["connection_id"] for a in agents} == before
        agents.append(late)
        wait_until(
            lambda: (
                Worker.objects.connected().filter(id__startswith="p-").count() == 7
                and registry_is_consistent()
            ),
            timeout=30,
            what="all seven workers registered after PostgreSQL came back",
        )
        for server in (cluster.a, cluster.b):
            status, body = get_json(f"{server.url}/readyz")
            assert status == 200, body
    finally:
        for agent in agents:
            agent.stop(timeout=5)
    for server in (cluster.a, cluster.b):
        assert server.process.poll() is None, server.log_tail()


def test_a_message_the_registry_cannot_record_gets_unavailable_and_the_socket_stays(
    cluster: Cluster,
) -> None:
    async def scenario() -> list[dict]:
        ws, _ = await open_worker(cluster.a.url, "patient")
        frame = json.dumps({"type": "register_public_ip", "ip": "198.51.100.40"})
        replies = []
        cluster.database.cut()
        try:
            await ws.send(frame)
            replies.append(json.loads(await ws.recv()))
            await ws.send('{"type": "heartbeat"}')  # needs no database: still answered
            replies.append(json.loads(await ws.recv()))
        finally:
            cluster.database.restore()
        await ws.send(frame)  # sent again, as the error asks
        replies.append(json.loads(await ws.recv()))
        await ws.close()
        return replies

    unavailable, ack, registered = asyncio.run(scenario())
    assert (unavailable["type"], unavailable["code"]) == ("error", "UNAVAILABLE")
    assert ack["type"] == "heartbeat_ack"
    assert registered == {"type": "public_ip_registered", "ip": "198.51.100.40"}
    assert Connection.objects.get(worker_id="patient").public_ip == "198.51.100.40"


def test_peer_events_and_introductions_cross_instances(cluster: Cluster) -> None:
    """A subscriber on a hears a join and a leave on b; a worker on a is introduced to one on b,
    and a relay frame and ICE candidates cross from a to b through Redis."""

    async def scenario() -> tuple[list[dict], dict, dict, bytes, dict]:
        watcher, _ = await open_worker(cluster.a.url, "watcher")
        await watcher.send(json.dumps({"type": "subscribe_peers"}))
        assert json.loads(await watcher.recv())["type"] == "peers_subscribed"
        far, _ = await open_worker(cluster.b.url, "far")
        events = [json.loads(await asyncio.wait_for(watcher.recv(), 5))]
        request = {
            "type": "connect_request",
            "peer_id": "far",
            "request_id": "x1",
            "transport": "datagrams",
        }
        await watcher.send(json.dumps({**request, "protocol_version": 2}))
        assert json.loads(await watcher.recv())["type"] == "connect_pending"
        asked = json.loads(await asyncio.wait_for(far.recv(), 5))
        introduction_id = asked["introduction_id"]
        await far.send(
            json.dumps(
                {
                    "type": "introduction_accept",
                    "introduction_id": introduction_id,
                    "protocol_version": 2,
                }
            )
        )
        for_far = json.loads(await asyncio.wait_for(far.recv(), 5))
        for_watcher = json.loads(await asyncio.wait_for(watcher.recv(), 5))
        frame = b"\x01" + bytes.fromhex(introduction_id) + b"\x00\x05hello"
        await watcher.send(frame)
        relayed = await asyncio.wait_for(far.recv(), 5)
        candidates = {
            "type": "ice_candidates",
            "introduction_id": introduction_id,
            "attempt": 0,
            "policy": "all",
            "ufrag": "abcd",
            "pwd": "p" * 22,
            "candidates": ["1 1 udp 2130706431 10.0.0.1 4000 typ host"],
            "done": True,
        }
        await watcher.send(json.dumps(candidates))
        passed_on = json.loads(await asyncio.wait_for(far.recv(), 5))
        await far.close()
        # Both come, in either order: peer_left is batched (50 ms), peer_closed is not.
        told = [json.loads(await asyncio.wait_for(watcher.recv(), 5)) for _ in range(2)]
        events += [m for m in told if m["type"] == "peer_left"]
        closed = next(m for m in told if m["type"] == "peer_closed")
        await watcher.close()
        assert passed_on == candidates
        return events, for_watcher, for_far, relayed, closed

    events, for_watcher, for_far, relayed, closed = asyncio.run(scenario())
    assert [(e["type"], e.get("worker_id") or e["peer"]["worker_id"]) for e in events] == [
        ("peer_joined", "far"),
        ("peer_left", "far"),
    ]
    assert for_watcher["type"] == for_far["type"] == "introduction"
    assert (for_watcher["role"], for_far["role"]) == ("initiator", "responder")
    assert relayed == b"\x01" + bytes.fromhex(for_far["introduction_id"]) + b"\x00\x05hello"
    assert closed["type"] == "peer_closed" and closed["reason"] == "worker far went offline"


def test_a_relayed_pair_on_two_instances_exchanges_data_through_redis(cluster: Cluster) -> None:
    """Real agents, one on each instance, without UDP: their data crosses the channel layer."""
    accepted: queue.Queue[PeerPath] = queue.Queue()
    b = WorkerAgent(
        cluster.b.url,
        "far-b",
        ip_echo_url="",
        peer_udp=False,
        on_peer_path=lambda agent, path: accepted.put(path),
    )
    a = WorkerAgent(cluster.a.url, "near-a", ip_echo_url="", peer_udp=False)
    try:
        b.start()
        a.start()
        assert a.wait_registered(10) and b.wait_registered(10)
        with a.connect_path("far-b", timeout=5) as path:
            other = accepted.get(timeout=5)
            for n in range(300):
                path.send(b"%d:" % n + b"x" * 2000)
            got = [other.recv(timeout=5) for _ in range(300)]
            other.send(b"back")
            assert path.recv(timeout=5) == b"back"
        assert got == [b"%d:" % n + b"x" * 2000 for n in range(300)]
        wait_until(lambda: path.closed, timeout=5, what="the path to close")
        assert [kind for _, kind in path.history] == ["relay", "none"]  # relay, then closed
    finally:
        a.stop(5)
        b.stop(5)
    record = PeerConnection.objects.get()
    assert (record.requester_id, record.target_id, record.path_kind) == ("near-a", "far-b", "relay")


def test_the_workers_of_a_killed_instance_are_announced_as_left_by_the_sweep(
    cluster: Cluster,
) -> None:
    async def scenario() -> dict:
        watcher, _ = await open_worker(cluster.b.url, "watcher")
        await watcher.send(json.dumps({"type": "subscribe_peers"}))
        assert json.loads(await watcher.recv())["type"] == "peers_subscribed"
        _socket, _ = await open_worker(cluster.a.url, "lost")  # kept open until a dies
        assert json.loads(await asyncio.wait_for(watcher.recv(), 5))["type"] == "peer_joined"
        cluster.a.kill()  # a cannot say that "lost" left; b's sweep must
        left = json.loads(await asyncio.wait_for(watcher.recv(), 15))
        await watcher.close()
        return left

    assert asyncio.run(scenario()) == {"type": "peer_left", "worker_id": "lost"}
