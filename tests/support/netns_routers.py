"""What NatTopology (tests/support/netns.py) adds to its routers once they stand: global IPv6
behind stateful firewalls, Debian's miniupnpd as a port-mapping router, and the faults and
counters the tests use (UDP blocked, mappings moved, packets counted)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.support.netns import Site

_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
PUBLIC_V6 = "2001:db8:ff::"  # the bridge's IPv6 network; site N's LAN is 2001:db8:N::/64


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class RouterFeatures:
    """Mixed into NatTopology: uses its namespaces, `_ip`, `_exec`, `run`, `popen`."""

    public: str
    log_dir: Path | None

    def _ip(self, namespace: str, *args: str) -> None:
        raise NotImplementedError

    def _exec(self, namespace: str, *argv: str) -> None:
        raise NotImplementedError

    def run(self, namespace: str, argv: Any, *, timeout: float = 30) -> Any:
        raise NotImplementedError

    def popen(self, namespace: str, argv: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        raise NotImplementedError

    def _add_miniupnpd_chains(self, site: Site) -> None:
        """The chains miniupnpd writes its rules into (Debian ships no script that makes them)."""
        iptables = [site.iptables, "-w", "5"]
        for table, chain, hook in (
            ("nat", "MINIUPNPD", ["PREROUTING", "-i", "wan0"]),
            ("nat", "MINIUPNPD-POSTROUTING", ["POSTROUTING", "-o", "wan0"]),
            ("filter", "MINIUPNPD", ["FORWARD", "-i", "wan0", "!", "-o", "wan0"]),
        ):
            self._exec(site.nat, *iptables, "-t", table, "-N", chain)
            self._exec(site.nat, *iptables, "-t", table, "-I", *hook, "-j", chain)

    def _build_site_ipv6(self, site: Site) -> None:
        """Global IPv6 without NAT: the router forwards 2001:db8:N::/64, and its stateful
        firewall lets in only replies and ICMPv6, as home routers do."""
        self._exec(site.nat, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self._ip(site.nat, "-6", "addr", "add", f"{site.public_ip6}/64", "dev", "wan0", "nodad")
        self._ip(site.nat, "-6", "addr", "add", f"2001:db8:{site.index}::1/64", "dev", "lan0",
                 "nodad")  # fmt: skip
        self._ip(site.nat, "-6", "route", "add", "default", "via", self.service_ip6s[0])
        self._ip(self.public, "-6", "route", "add", f"2001:db8:{site.index}::/64",
                 "via", site.public_ip6)  # fmt: skip
        for worker, address in zip(site.workers, site.worker_ip6s, strict=True):
            self._ip(worker, "-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
            self._ip(worker, "-6", "route", "add", "default", "via", f"2001:db8:{site.index}::1")
        rules = [
            ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j",
             "ACCEPT"],
            ["-A", "FORWARD", "-p", "ipv6-icmp", "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", "lan0", "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", "wan0", "-j", "DROP"],
        ]  # fmt: skip
        for rule in rules:
            self._exec(site.nat, "ip6tables", "-w", "5", *rule)

    @property
    def service_ip6s(self) -> list[str]:
        """The public namespace's IPv6 addresses (with ipv6=True): the service's and STUN's."""
        return [f"{PUBLIC_V6}10", f"{PUBLIC_V6}11"]

    def start_miniupnpd(self, site: Site) -> subprocess.Popen[Any]:
        """Debian's miniupnpd on `site`'s router (NatKind.MINIUPNPD): NAT-PMP, PCP and UPnP IGD
        on its LAN side. Returned once it listens; stopped by `down()`."""
        if site.iptables != "iptables-legacy":  # only the miniupnpd kind of router
            raise ValueError(f"{site.nat} is not a miniupnpd router")
        if self.log_dir is None:
            raise ValueError("start_miniupnpd needs a log_dir for its configuration and log")
        binary = shutil.which("miniupnpd", path=_PATH)
        if binary is None:
            raise RuntimeError("miniupnpd is not installed (tools/install_system_packages.sh)")
        config = self.log_dir / f"miniupnpd-{site.nat}.conf"
        config.write_text(
            "ext_ifname=wan0\nlistening_ip=lan0\nport=0\nenable_natpmp=yes\n"
            "enable_upnp=yes\nsecure_mode=no\nsystem_uptime=no\n"
            "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n"
            f"allow 1024-65535 10.0.{site.index}.0/24 1024-65535\n"
            "deny 0-65535 0.0.0.0/0 0-65535\n"
        )
        log_name = f"miniupnpd-{site.nat}.log"
        pidfile = self.log_dir / f"miniupnpd-{site.nat}.pid"
        process = self.popen(
            site.nat, [binary, "-f", str(config), "-d", "-4", "-P", str(pidfile)],
            log_name=log_name,
        )  # fmt: skip
        log_path = self.log_dir / log_name
        deadline = time.monotonic() + 15
        while "HTTP listening on port" not in read_log(log_path):
            if process.poll() is not None:
                raise RuntimeError(f"miniupnpd exited {process.returncode}:\n{read_log(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"miniupnpd not listening after 15s:\n{read_log(log_path)}")
            time.sleep(0.05)
        time.sleep(0.2)  # NAT-PMP and SSDP sockets open right after the HTTP one
        return process

    def block_udp(self, site: Site, *, to: str | None = None) -> None:
        """Drop the UDP the site's NAT would forward out (to one address, or anywhere): a
        firewall that lets only TCP through, such as a corporate network's."""
        self._exec(site.nat, site.iptables, "-w", "5", *self._udp_rule("-I", to))

    def unblock_udp(self, site: Site, *, to: str | None = None) -> None:
        self._exec(site.nat, site.iptables, "-w", "5", *self._udp_rule("-D", to))

    @staticmethod
    def _udp_rule(action: str, to: str | None) -> list[str]:
        destination = ["-d", to] if to else []
        return [action, "FORWARD", "-i", "lan0", "-p", "udp", *destination, "-j", "DROP"]

    def rebind_udp(self, site: Site, ports: str) -> int:
        """Move the public port of every UDP flow of the site's workers, as a NAT that loses its
        mappings (a reboot, a timeout under load, a carrier-grade NAT's rebalancing) does: new
        flows leave from `ports` (a range such as "61000-61099": above the ephemeral ports the
        workers bind, so that every flow moves; endpoint-independent still), and the conntrack
        entries of the old ones are deleted, so the peer's packets to the old port meet the
        drop-unsolicited rule. TCP (the agent's WebSocket) keeps its mapping. Returns how many
        entries were deleted. These kernels come without the `conntrack` tool: the entries are
        deleted through ctnetlink (pyroute2), inside the NAT."""
        self._exec(site.nat, "iptables", "-w", "5", "-t", "nat", "-I", "POSTROUTING", "1",
                   "-o", "wan0", "-p", "udp", "-j", "SNAT",
                   "--to-source", f"{site.public_ip}:{ports}")  # fmt: skip
        deleted = 0
        for worker_ip in site.worker_ips:
            argv = [sys.executable, "-m", "tests.support.conntrack", "delete-udp", worker_ip]
            deleted += int(self.run(site.nat, argv).stdout.strip())
        return deleted

    def forwarded_udp(self, site: Site, destination: str) -> int:
        """Packets the site's NAT forwarded to `destination` so far (a counting rule is added
        on the first call)."""
        rule = ["FORWARD", "-o", "wan0", "-p", "udp", "-d", destination]
        try:
            self._exec(site.nat, site.iptables, "-w", "5", "-C", *rule)
        except RuntimeError:
            self._exec(site.nat, site.iptables, "-w", "5", "-A", *rule)
        listing = self.run(site.nat, [site.iptables, "-w", "5", "-nvxL", "FORWARD"]).stdout
        for line in listing.splitlines():
            fields = line.split()
            if fields[-1:] == [destination] and "DROP" not in fields:
                return int(fields[0])
        raise AssertionError(f"no counting rule for {destination} in {site.nat}:\n{listing}")

    def input_drop_packets(self, site: Site) -> int:
        """Packets the NAT's drop-unsolicited-inbound rule has dropped so far."""
        output = self.run(
            site.nat, [site.iptables, "-w", "5", "-L", "INPUT", "-v", "-x", "-n"]
        ).stdout
        for line in output.splitlines():
            if "DROP" in line and "wan0" in line and "NEW" in line:
                return int(line.split()[0])
        raise AssertionError(f"no drop rule for wan0 in {site.nat}:\n{output}")
