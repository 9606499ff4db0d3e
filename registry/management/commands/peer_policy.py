"""`python manage.py peer_policy check A B`: may worker A reach worker B, and which rule says so?
`python manage.py peer_policy show`: the mode and the enabled rules, as the service reads them.
With `--rules`, both judge by the rules even while RENDEZVOUS_PEER_POLICY is allow-all: to try
rules out before enforcing them.

`check` prints `allowed: ...` or `denied: ...` on stdout and exits 0 or 1 (scripts can test it);
anything else goes to stderr."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from registry.core import peer_policy, protocol
from registry.peering import reach, rules
from registry.presence import selectors


class Command(BaseCommand):
    help = "Check a pair of workers against the peer policy, or show the policy."

    def add_arguments(self, parser: Any) -> None:
        commands = parser.add_subparsers(dest="command", required=True)
        check = commands.add_parser("check", help="May SOURCE reach DESTINATION?")
        check.add_argument("source", help="the worker that would ask (its id)")
        check.add_argument("destination", help="the worker it would ask to reach (its id)")
        show = commands.add_parser("show", help="The mode and the enabled rules.")
        for command in (check, show):
            command.add_argument(
                "--rules",
                action="store_true",
                help="judge by the rules even if RENDEZVOUS_PEER_POLICY is allow-all",
            )

    def handle(self, *args: Any, **options: Any) -> None:
        policy = rules.load(peer_policy.RULES if options["rules"] else None)
        if options["command"] == "show":
            self._show(policy)
            return
        source, destination = options["source"], options["destination"]
        for worker_id in (source, destination):
            if not protocol.is_valid_worker_id(worker_id):
                raise CommandError(f"{worker_id!r} is not a worker id")
            if not selectors.worker_exists(worker_id):
                self.stderr.write(f"note: no worker {worker_id} in the registry (no tags)")
        decision = rules.decide(policy, reach.subject(source), reach.subject(destination))
        if decision.allowed:
            self.stdout.write(f"allowed: {source} may reach {destination} ({decision.by})")
            return
        self.stdout.write(f"denied: {decision.reason}")
        sys.exit(1)

    def _show(self, policy: peer_policy.Policy) -> None:
        self.stdout.write(f"RENDEZVOUS_PEER_POLICY: {policy.mode}")
        if policy.mode == peer_policy.ALLOW_ALL:
            self.stdout.write("every worker may reach every other; rules are not enforced")
            return
        if not policy.rules:
            self.stdout.write("no enabled rules: no worker may reach another")
        for rule in policy.rules:
            self.stdout.write(
                f"#{rule.id}: {peer_policy.format_side(rule.sources)} -> "
                f"{peer_policy.format_side(rule.destinations)}"
                + (f"  ({rule.description})" if rule.description else "")
            )
