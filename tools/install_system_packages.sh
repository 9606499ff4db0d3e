#!/bin/sh
# System packages the tests need: iptables (MASQUERADE inside network namespaces) and iproute2
# (`ip netns`, veth, bridge) for the NAT traversal tests, coturn (the TURN relay those tests run
# next to the service), miniupnpd-iptables (Debian's miniupnpd: the port-mapping router of
# tests/test_direct_e2e.py and bench/nat_matrix.py; iptables-legacy comes with iptables), and chromium for the browser tests of the admin
# (tests/test_browser_admin.py, driven by Playwright). Idempotent: installs only what is
# missing, with apt-get, non-interactively. Without root or without apt-get it changes nothing and exits 0; those tests
# then skip with a reason (or fail under RENDEZVOUS_REQUIRE_SERVICES=1).
set -eu

say() { echo "install_system_packages: $*"; }
# iptables and ip live in sbin, which a non-login root shell may not have on PATH.
PATH="$PATH:/usr/sbin:/sbin"

if [ "$(id -u)" != "0" ]; then
    say "not root; nothing installed (NAT and browser tests will skip)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get; nothing installed (NAT tests need iptables and iproute2, browser tests chromium)"
    exit 0
fi

missing=""
command -v iptables >/dev/null 2>&1 || missing="$missing iptables"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v turnserver >/dev/null 2>&1 || missing="$missing coturn"
command -v miniupnpd >/dev/null 2>&1 || missing="$missing miniupnpd-iptables"
# fonts-liberation is only recommended, and without recommends pages would render in fallbacks.
command -v chromium >/dev/null 2>&1 || missing="$missing chromium fonts-liberation"
if [ -z "$missing" ]; then
    say "iptables, iproute2, coturn, miniupnpd and chromium already installed"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
say "installing:$missing"
# shellcheck disable=SC2086  # word splitting of the package list is intended
if ! apt-get install -y -q --no-install-recommends $missing; then
    say "install failed; refreshing the package index and retrying"
    apt-get update -q
    apt-get install -y -q --no-install-recommends $missing
fi
say "installed:$missing"
