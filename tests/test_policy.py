"""The peer policy's evaluation, as plain functions: the rule syntax, directional rules, the two
modes, and the properties that make rules safe to add (registry/core/peer_policy.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.core.peer_policy import (
    ALLOW_ALL,
    RULES,
    InvalidRule,
    Policy,
    Reach,
    Rule,
    Selector,
    Subject,
    format_side,
    parse_side,
)
from registry.ops import metrics

CI = Subject.of("ci-runner-1", ["ci"])
CI2 = Subject.of("ci-runner-2", ["CI"])
GPU = Subject.of("gpu-box-7", ["gpu"])
LAPTOP = Subject.of("laptop-3")


def rule(rule_id: int, sources: str, destinations: str) -> Rule:
    return Rule(rule_id, f"rule {rule_id}", parse_side(sources), parse_side(destinations))


def test_a_side_reads_ids_tags_and_any_in_any_spacing() -> None:
    side = parse_side(" gpu-box-7,tag:GPU  tag:gpu *\n worker.a_b-1 ")
    assert side == (
        Selector("worker", "gpu-box-7"),
        Selector("tag", "gpu"),  # tags are case-insensitive; duplicates dropped
        Selector("any"),
        Selector("worker", "worker.a_b-1"),
    )
    assert format_side(side) == "gpu-box-7, tag:gpu, *, worker.a_b-1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one"),
        (" , ", "at least one"),
        ("tag:", "is not a tag"),
        ("tag:-gpu", "is not a tag"),
        ("tag:" + "g" * 65, "is not a tag"),
        ("gpu box/7", "neither a worker id"),
        ("-leading-dash", "neither a worker id"),
        ("x" * 129, "neither a worker id"),
        ("**", "neither a worker id"),
        (" ".join(f"w{n}" for n in range(101)), "at most 100"),
    ],
)
def test_a_malformed_side_is_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidRule, match=message):
        parse_side(text)


def test_allow_all_lets_anyone_reach_anyone() -> None:
    decision = Policy(ALLOW_ALL).decide(LAPTOP, GPU)
    assert decision.allowed and decision.rule is None
    assert decision.by == "RENDEZVOUS_PEER_POLICY is allow-all"


def test_rules_mode_with_no_rules_reaches_nothing() -> None:
    decision = Policy(RULES).decide(CI, GPU)
    assert not decision.allowed
    assert decision.reason == "no peer policy rule lets ci-runner-1 reach gpu-box-7"


def test_rules_are_directional_and_name_the_rule_that_allowed() -> None:
    policy = Policy(RULES, (rule(3, "tag:ci", "tag:gpu"),))
    decision = policy.decide(CI, GPU)
    assert decision.allowed and decision.rule is not None and decision.rule.id == 3
    assert decision.by == "rule #3 (rule 3)"
    assert not policy.allows(GPU, CI)  # the other way round needs a rule of its own
    assert policy.allows(CI2, GPU)  # "CI" is "ci"
    assert not policy.allows(CI, CI2)  # CI may reach GPU boxes, not each other
    assert not policy.allows(LAPTOP, GPU)


def test_ids_and_any_select_as_written() -> None:
    policy = Policy(RULES, (rule(1, "laptop-3", "*"), rule(2, "*", "laptop-3")))
    assert policy.allows(LAPTOP, GPU) and policy.allows(LAPTOP, CI)
    assert policy.allows(GPU, LAPTOP) and not policy.allows(GPU, CI)
    assert policy.reach_from(LAPTOP) == Reach(any=True)
    assert policy.reach_to(LAPTOP) == Reach(any=True)
    assert policy.reach_from(GPU) == Reach(worker_ids=frozenset({"laptop-3"}))
    assert Policy(RULES, (rule(1, "tag:ci", "tag:gpu gpu-box-9"),)).reach_to(GPU) == Reach(
        tags=frozenset({"ci"})
    )
    assert Policy(RULES).reach_from(CI).nobody


def test_a_decision_that_cannot_be_made_is_a_refusal_and_is_counted() -> None:
    """The policy says so (`error`) and stays plain: the service's callers count it."""
    from registry.peering import rules

    def errors() -> float:
        value = metrics.REGISTRY.get_sample_value(
            "rendezvous_policy_errors_total", {"instance_name": metrics._instance()}
        )
        return value or 0.0

    before = errors()
    broken = Policy(RULES, (Rule(1, "broken", (None,), (Selector("any"),)),))  # type: ignore[arg-type]
    decision = broken.decide(CI, GPU)
    assert not decision.allowed and decision.error and "could not be evaluated" in decision.reason
    assert broken.reach_from(CI).error and broken.reach_from(CI).nobody
    assert errors() == before  # core counts nothing
    assert rules.decide(broken, CI, GPU).allowed is False
    assert rules.decide(Policy("allow-some"), CI, GPU).allowed is False  # an unknown mode too
    assert rules.reach_from(broken, CI).nobody
    assert errors() == before + 3


# ---- properties --------------------------------------------------------------------------------

ids = st.sampled_from(["a", "b", "c", "gpu-1", "ci-1"])
tags = st.sampled_from(["gpu", "ci", "lab"])
selectors = st.one_of(
    st.just(Selector("any")),
    tags.map(lambda t: Selector("tag", t)),
    ids.map(lambda i: Selector("worker", i)),
)
sides = st.lists(selectors, min_size=1, max_size=3).map(tuple)
rules = st.builds(Rule, st.integers(1, 1000), st.just(""), sides, sides)
subjects = st.builds(Subject.of, ids, st.lists(tags, max_size=2))


@given(st.lists(rules, max_size=5), rules, subjects, subjects)
def test_adding_a_rule_never_removes_reachability(
    existing: list[Rule], added: Rule, source: Subject, destination: Subject
) -> None:
    before = Policy(RULES, tuple(existing))
    after = Policy(RULES, (*existing, added))
    if before.allows(source, destination):
        assert after.allows(source, destination)


@given(st.lists(rules, max_size=5), subjects, subjects)
def test_a_pair_is_allowed_exactly_when_some_rule_matches_both_sides(
    existing: list[Rule], source: Subject, destination: Subject
) -> None:
    policy = Policy(RULES, tuple(existing))
    expected = any(
        any(s.matches(source) for s in r.sources)
        and any(d.matches(destination) for d in r.destinations)
        for r in existing
    )
    assert policy.allows(source, destination) is expected


@given(subjects, subjects)
def test_no_rules_reach_nothing_and_allow_all_reaches_everything(
    source: Subject, destination: Subject
) -> None:
    assert not Policy(RULES).allows(source, destination)
    assert Policy(ALLOW_ALL).allows(source, destination)


@given(sides)
def test_a_side_reads_back_as_it_was_written(side: tuple[Selector, ...]) -> None:
    unique = tuple(dict.fromkeys(side))
    assert parse_side(format_side(side)) == unique


@given(st.lists(rules, max_size=5), subjects, subjects)
def test_the_reach_a_query_uses_says_what_a_decision_says(
    existing: list[Rule], source: Subject, destination: Subject
) -> None:
    """list_peers, the peer events and the admin filter by `reach_from` / `reach_to`; the
    introductions decide pair by pair: the two must agree, both ways, in both modes."""
    for mode in (RULES, ALLOW_ALL):
        policy = Policy(mode, tuple(existing))
        allowed = policy.allows(source, destination)
        assert policy.reach_from(source).matches(destination) is allowed
        assert policy.reach_to(destination).matches(source) is allowed
