"""Real NAT on one machine, for the NAT traversal tests: network namespaces, veths, a bridge and
iptables MASQUERADE, as measured in /work/shared/nat-testing.md.

    public namespace  (bridge br0: 203.0.113.10 and .11: the service, STUN, coturn)
      |-- NAT n1 (wan0 203.0.113.1, bridge lan0 10.0.1.1, MASQUERADE)
      |      |-- worker w1 (eth0 10.0.1.2), and with workers=2 also w1b (eth0 10.0.1.3)
      |-- NAT n2 (wan0 203.0.113.2, lan0 10.0.2.1, MASQUERADE --random-fully) -- worker w2
      ...

203.0.113.0/24 is a documentation range and exists only on these veths; nothing here can reach
the machine's real network (the public namespace has no route out). Every NAT also drops
inbound packets in conntrack state NEW on its public interface, as home routers do: without
that, a peer's early probe takes the conntrack tuple the worker's own outbound probe needs,
MASQUERADE picks another source port, and every hole punch fails.

Namespaces are global to the machine, so names carry a prefix unique to the run
(`rdv<pid>t<n>`), and everything is torn down in `finally`: first the processes started in the
namespaces, then the namespaces, even when the test body failed.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from tests.support.backing import require_or_skip
from tests.support.netns_routers import PUBLIC_V6, RouterFeatures, read_log
from tests.support.processes import REPO

SERVICE_IP = "203.0.113.10"
SECOND_SERVICE_IP = "203.0.113.11"  # a second address for the second STUN listener
STUN_PORT = 3478
SECOND_STUN_PORT = 3479
TURN_PORT = 3480
# What coturn must not relay to: private, loopback, link-local and multicast networks, or a
# TURN client could reach an operator's internal network through it.
DENIED_PEER_RANGES = (
    "0.0.0.0-0.255.255.255",
    "10.0.0.0-10.255.255.255",
    "100.64.0.0-100.127.255.255",
    "127.0.0.0-127.255.255.255",
    "169.254.0.0-169.254.255.255",
    "172.16.0.0-172.31.255.255",
    "192.168.0.0-192.168.255.255",
    "::1",
    "fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "fe80::-febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
)
MAX_SITES = 9  # NAT public addresses are 203.0.113.1 .. .9, below the service's

# iptables and ip live in sbin, which a non-login shell may not have on PATH.
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_ENV = {**os.environ, "PATH": _PATH}
_counter = itertools.count(1)


class NatKind(StrEnum):
    """What each router is, in RFC 4787's terms and in iptables' (every one drops unsolicited
    inbound packets in conntrack state NEW, as home routers do)."""

    # Endpoint-independent mapping (keeps the source port if it can) and address-and-port-
    # dependent filtering: only replies to a remote address and port the worker sent to pass
    # (conntrack). A "port-restricted cone".
    MASQUERADE = "masquerade"
    # Endpoint-independent mapping and filtering: MASQUERADE plus a DNAT of all inbound UDP to
    # the worker (the port MASQUERADE kept is the worker's own). A "full cone".
    FULL_CONE = "full-cone"
    # Endpoint-dependent mapping ("symmetric"): MASQUERADE --random-fully, a new port per
    # destination.
    RANDOM_FULLY = "random-fully"
    # RANDOM_FULLY, in legacy iptables, with Debian's miniupnpd answering NAT-PMP, PCP and UPnP
    # IGD on the LAN side; its outside address is 198.20.0.N (miniupnpd refuses mappings when
    # it is in a reserved range such as 203.0.113.0/24).
    MINIUPNPD = "miniupnpd"


UPNP_OUTSIDE_NET = "198.20.0"  # the miniupnpd routers' outside addresses, on the same bridge


@dataclass(frozen=True)
class Site:
    """One NAT router and the worker namespaces behind it (one LAN)."""

    index: int
    kind: NatKind
    nat: str  # namespace names
    workers: tuple[str, ...]
    public_ip: str  # the NAT's address on the public bridge, what STUN reports
    gateway_ip: str  # the NAT's LAN address, the workers' default route
    worker_ips: tuple[str, ...]
    ipv6: bool = False

    @property
    def iptables(self) -> str:
        """miniupnpd writes legacy iptables rules; its router's own rules must be legacy too."""
        return "iptables-legacy" if self.kind is NatKind.MINIUPNPD else "iptables"

    @property
    def worker_ip6s(self) -> tuple[str, ...]:
        return tuple(f"2001:db8:{self.index}::{2 + n}" for n in range(len(self.workers)))

    @property
    def public_ip6(self) -> str:
        return f"{PUBLIC_V6}{self.index}"

    @property
    def worker(self) -> str:
        return self.workers[0]

    @property
    def worker_ip(self) -> str:
        return self.worker_ips[0]


def _which(name: str) -> str | None:
    return shutil.which(name, path=_PATH)


def miniupnpd_unavailable_reason() -> str | None:
    """Why a miniupnpd router cannot be built here (None: it can)."""
    if _which("miniupnpd") is None:
        return "needs miniupnpd (tools/install_system_packages.sh installs miniupnpd-iptables)"
    if _which("iptables-legacy") is None:
        return "needs iptables-legacy (miniupnpd writes legacy iptables rules)"
    return None


def require_miniupnpd() -> None:
    require_netns()
    reason = miniupnpd_unavailable_reason()
    require_or_skip(reason is None, reason or "")


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why these tests cannot run here (None: they can). Probes once per test process."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "NAT tests need root (network namespaces and iptables)"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if _which(tool) is None:
            return f"NAT tests need `{tool}` (tools/install_system_packages.sh installs {package})"
    probe = f"rdv{os.getpid()}probe"
    try:
        _run(["ip", "netns", "add", probe])
    except RuntimeError as exc:
        return f"`ip netns add` does not work here: {exc}"
    try:
        _run(
            ["ip", "netns", "exec", probe, "iptables", "-w", "5", "-t", "nat", "-A",
             "POSTROUTING", "-o", "lo", "-j", "MASQUERADE", "--random-fully"]
        )  # fmt: skip
    except RuntimeError as exc:
        return f"iptables MASQUERADE does not work in a network namespace: {exc}"
    finally:
        with contextlib.suppress(RuntimeError):
            _run(["ip", "netns", "del", probe])
    return None


def require_netns() -> None:
    """Skip with the reason, or fail under RENDEZVOUS_REQUIRE_SERVICES=1 (CI must run these)."""
    reason = netns_unavailable_reason()
    require_or_skip(reason is None, reason or "")


def _run(argv: Sequence[str], *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=_ENV, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def list_namespaces() -> list[str]:
    output = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in output.splitlines() if line.strip()]


class NatTopology(RouterFeatures):
    """A public network and one NAT router plus worker per entry of `kinds`. Use as a context
    manager (or call `up()` and, in a `finally`, `down()`)."""

    def __init__(
        self,
        kinds: Sequence[NatKind | str] = (NatKind.MASQUERADE,),
        *,
        workers: Sequence[int] | None = None,
        prefix: str | None = None,
        service_ips: Sequence[str] = (SERVICE_IP, SECOND_SERVICE_IP),
        log_dir: Path | None = None,
        ipv6: bool = False,
    ) -> None:
        if not 1 <= len(kinds) <= MAX_SITES:
            raise ValueError(f"between 1 and {MAX_SITES} NAT sites, not {len(kinds)}")
        self.prefix = prefix or f"rdv{os.getpid()}t{next(_counter)}"
        self.public = f"{self.prefix}pub"
        self.service_ips = list(service_ips)
        self.log_dir = log_dir
        counts = list(workers) if workers is not None else [1] * len(kinds)
        if len(counts) != len(kinds) or not all(1 <= n <= 9 for n in counts):
            raise ValueError("workers: one count (1 to 9) per NAT site")
        self.sites = [
            Site(
                index=i,
                kind=NatKind(kind),
                nat=f"{self.prefix}n{i}",
                workers=tuple(
                    f"{self.prefix}w{i}" + ("" if n == 0 else chr(ord("a") + n))
                    for n in range(count)
                ),
                public_ip=(
                    f"{UPNP_OUTSIDE_NET}.{i}" if kind == NatKind.MINIUPNPD else f"203.0.113.{i}"
                ),
                gateway_ip=f"10.0.{i}.1",
                worker_ips=tuple(f"10.0.{i}.{2 + n}" for n in range(count)),
                ipv6=ipv6,
            )
            for i, (kind, count) in enumerate(zip(kinds, counts, strict=True), start=1)
        ]
        self.created: list[str] = []  # namespaces, in creation order: only these are deleted
        self.processes: list[subprocess.Popen[Any]] = []
        self.setup_seconds: float | None = None
        self.teardown_seconds: float | None = None

    # -- building and tearing down --------------------------------------------------------------

    def up(self) -> NatTopology:
        started = time.monotonic()
        self._add_namespace(self.public)
        self._ip(self.public, "link", "set", "lo", "up")
        self._ip(self.public, "link", "add", "br0", "type", "bridge")
        for address in self.service_ips:
            self._ip(self.public, "addr", "add", f"{address}/24", "dev", "br0")
        self._ip(self.public, "addr", "add", f"{UPNP_OUTSIDE_NET}.254/24", "dev", "br0")
        self._ip(self.public, "link", "set", "br0", "up")
        if self.sites[0].ipv6:
            self._exec(self.public, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            for address in self.service_ip6s:
                self._ip(self.public, "-6", "addr", "add", f"{address}/64", "dev", "br0", "nodad")
        for site in self.sites:
            self._build_site(site)
            if site.ipv6:
                self._build_site_ipv6(site)
        self.setup_seconds = time.monotonic() - started
        return self

    def _build_site(self, site: Site) -> None:
        port = f"p{site.index}"  # the NAT's veth end on the bridge
        self._add_namespace(site.nat)
        # Both ends are created directly in their namespaces: no name ever appears in the
        # machine's own namespace, so parallel runs cannot collide on interface names.
        self._ip(site.nat, "link", "add", "wan0", "type", "veth", "peer", "name", port,
                 "netns", self.public)  # fmt: skip
        self._ip(self.public, "link", "set", port, "master", "br0", "up")
        self._ip(site.nat, "addr", "add", f"{site.public_ip}/24", "dev", "wan0")
        # The LAN is a bridge in the NAT's namespace, one veth per worker.
        self._ip(site.nat, "link", "add", "lan0", "type", "bridge")
        self._ip(site.nat, "addr", "add", f"{site.gateway_ip}/24", "dev", "lan0")
        for device in ("lo", "wan0", "lan0"):
            self._ip(site.nat, "link", "set", device, "up")
        for n, (worker, worker_ip) in enumerate(zip(site.workers, site.worker_ips, strict=True)):
            self._add_namespace(worker)
            self._ip(site.nat, "link", "add", f"l{n}", "type", "veth", "peer", "name", "eth0",
                     "netns", worker)  # fmt: skip
            self._ip(site.nat, "link", "set", f"l{n}", "master", "lan0", "up")
            self._ip(worker, "addr", "add", f"{worker_ip}/24", "dev", "eth0")
            for device in ("lo", "eth0"):
                self._ip(worker, "link", "set", device, "up")
            self._ip(worker, "route", "add", "default", "via", site.gateway_ip)
        # Both outside networks share the bridge: each is on-link from every router.
        other = "203.0.113.0/24" if site.kind is NatKind.MINIUPNPD else f"{UPNP_OUTSIDE_NET}.0/24"
        self._ip(site.nat, "route", "add", other, "dev", "wan0")
        masquerade = ["-j", "MASQUERADE"]
        if site.kind in (NatKind.RANDOM_FULLY, NatKind.MINIUPNPD):
            masquerade.append("--random-fully")
        iptables = [site.iptables, "-w", "5"]
        self._exec(site.nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._exec(site.nat, *iptables, "-t", "nat", "-A", "POSTROUTING",
                   "-o", "wan0", *masquerade)  # fmt: skip
        # The pitfall rule: unsolicited inbound packets die before conntrack confirms them.
        self._exec(site.nat, *iptables, "-A", "INPUT", "-i", "wan0",
                   "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")  # fmt: skip
        if site.kind is NatKind.FULL_CONE:
            self._exec(site.nat, *iptables, "-t", "nat", "-A", "PREROUTING", "-i", "wan0",
                       "-p", "udp", "-j", "DNAT", "--to-destination", site.worker_ip)  # fmt: skip
        if site.kind is NatKind.MINIUPNPD:
            self._add_miniupnpd_chains(site)

    def down(self) -> list[str]:
        """Stop our processes, then delete our namespaces. Returns what could not be cleaned."""
        started = time.monotonic()
        problems: list[str] = []
        for process in self.processes:
            _stop(process)
        for namespace in reversed(self.created):
            # Anything still inside was started by us (a child of one of our processes).
            try:
                pids = _run(["ip", "netns", "pids", namespace]).stdout.split()
            except RuntimeError:
                pids = []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                _run(["ip", "netns", "del", namespace])
            except RuntimeError as exc:
                problems.append(str(exc))
        self.created.clear()
        self.teardown_seconds = time.monotonic() - started
        return problems

    def __enter__(self) -> NatTopology:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        problems = self.down()
        if problems and exc_type is None:
            raise RuntimeError("NAT topology teardown: " + "; ".join(problems))

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.created.append(name)

    def _ip(self, namespace: str, *args: str) -> None:
        _run(["ip", "-n", namespace, *args])

    def _exec(self, namespace: str, *argv: str) -> None:
        _run(["ip", "netns", "exec", namespace, *argv])

    # -- running things inside --------------------------------------------------------------

    def popen(
        self,
        namespace: str,
        argv: Sequence[str],
        *,
        log_name: str | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside `namespace` (cwd: the repository); stopped by `down()`.

        With `log_name` (and a log_dir) stdout and stderr go to that file; otherwise to the
        caller's choice in kwargs, or nowhere.
        """
        if namespace not in self.created:
            raise ValueError(f"{namespace} is not one of this topology's namespaces")
        stdout: IO[bytes] | int | None = kwargs.pop("stdout", subprocess.DEVNULL)
        stderr: IO[bytes] | int | None = kwargs.pop("stderr", subprocess.STDOUT)
        log = None
        if log_name is not None:
            if self.log_dir is None:
                raise ValueError("log_name needs a log_dir")
            log = (self.log_dir / log_name).open("ab")
            stdout, stderr = log, subprocess.STDOUT
        kwargs.setdefault("cwd", REPO)
        kwargs.setdefault("env", {**_ENV, "PYTHONUNBUFFERED": "1"})
        try:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *argv],
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                **kwargs,
            )
        finally:
            if log is not None:
                log.close()
        self.processes.append(process)
        return process

    def run(
        self, namespace: str, argv: Sequence[str], *, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `namespace` to completion; raises with its output if it fails."""
        process = self.popen(
            namespace, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process)
            raise
        if process.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} in {namespace} exited {process.returncode}:\n{stdout}{stderr}"
            )
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def python(self, namespace: str, *args: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """This interpreter (the project's virtualenv) inside `namespace`."""
        return self.popen(namespace, [sys.executable, *args], **kwargs)

    def start_stun(
        self,
        *,
        host: str = SERVICE_IP,
        port: int = STUN_PORT,
        second_host: str | None = SECOND_SERVICE_IP,
        second_port: int | None = SECOND_STUN_PORT,
        timeout: float = 15,
    ) -> subprocess.Popen[Any]:
        """The project's STUN responder in the public namespace, returned once it listens."""
        if self.log_dir is None:
            raise ValueError("start_stun needs a log_dir for the responder's log")
        argv = ["-m", "registry.peering.stun", "--host", host, "--port", str(port)]
        if second_host is not None:
            argv += ["--second-host", second_host]
        if second_port is not None:
            argv += ["--second-port", str(second_port)]
        log_name = f"stun-{self.prefix}.log"
        process = self.python(self.public, *argv, log_name=log_name)
        log_path = self.log_dir / log_name
        deadline = time.monotonic() + timeout
        while "STUN responder on" not in read_log(log_path):
            if process.poll() is not None:
                raise RuntimeError(
                    f"STUN responder exited {process.returncode}:\n{read_log(log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"STUN responder not listening after {timeout}s")
            time.sleep(0.02)
        return process

    def start_turn(
        self,
        *,
        secret: str,
        host: str = SERVICE_IP,
        port: int = TURN_PORT,
        timeout: float = 15,
    ) -> subprocess.Popen[Any]:
        """coturn in the public namespace with the TURN REST secret, returned once it listens.
        It relays between public addresses only: private and loopback peers are denied, as
        docs/nat-traversal.md tells operators to configure it."""
        if self.log_dir is None:
            raise ValueError("start_turn needs a log_dir for coturn's log")
        binary = _which("turnserver")
        if binary is None:
            raise RuntimeError("coturn is not installed (tools/install_system_packages.sh)")
        log_name = f"coturn-{self.prefix}.log"
        empty = self.log_dir / "turnserver.conf"  # not the machine's /etc/turnserver.conf
        empty.write_text("")
        argv = [
            binary, "-c", str(empty), "--no-cli", "--no-tls", "--no-dtls", "--fingerprint",
            f"--listening-ip={host}", f"--listening-port={port}", f"--relay-ip={host}",
            "--min-port=50000", "--max-port=50999",
            "--use-auth-secret", f"--static-auth-secret={secret}", "--realm=rendezvous.test",
            *(f"--denied-peer-ip={r}" for r in DENIED_PEER_RANGES),
            "--no-multicast-peers", "--simple-log", "--log-file=stdout", "--verbose",
            f"--pidfile={self.log_dir / f'coturn-{self.prefix}.pid'}",
        ]  # fmt: skip
        process = self.popen(self.public, argv, log_name=log_name)
        log_path = self.log_dir / log_name
        deadline = time.monotonic() + timeout
        while "Total General servers" not in read_log(log_path):  # coturn's last start-up line
            if process.poll() is not None:
                raise RuntimeError(f"coturn exited {process.returncode}:\n{read_log(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"coturn not listening after {timeout}s:\n{read_log(log_path)}")
            time.sleep(0.05)
        return process


def _stop(process: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL: only ever the process we started, by its own handle."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@contextlib.contextmanager
def nat_topology(
    *kinds: NatKind | str,
    workers: Sequence[int] | None = None,
    log_dir: Path | None = None,
    prefix: str | None = None,
    ipv6: bool = False,
) -> Iterator[NatTopology]:
    """`with nat_topology("masquerade", "random-fully", log_dir=tmp_path) as net:`"""
    with NatTopology(
        kinds or (NatKind.MASQUERADE,), workers=workers, log_dir=log_dir, prefix=prefix, ipv6=ipv6
    ) as topology:
        yield topology
