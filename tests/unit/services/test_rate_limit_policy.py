"""Policy parsing and validation (no Redis involved)."""

from __future__ import annotations

import pytest

from app.services.rate_limit import Policy, as_policies, parse_policies


@pytest.mark.parametrize(
    ("text", "limit", "window", "name"),
    [
        ("10/second", 10, 1.0, "10-per-second"),
        ("100/minute", 100, 60.0, "100-per-minute"),
        ("100 / minute", 100, 60.0, "100-per-minute"),
        ("5 per 10 seconds", 5, 10.0, "5-per-10s"),
        ("1000/day", 1000, 86400.0, "1000-per-day"),
        ("3/hour", 3, 3600.0, "3-per-hour"),
        ("7/week", 7, 604800.0, "7-per-week"),
        ("20/500ms", 20, 0.5, "20-per-500ms"),
        ("2 per 1.5 s", 2, 1.5, "2-per-1.5s"),
        ("10/2 minutes", 10, 120.0, "10-per-120s"),
        ("10/s", 10, 1.0, "10-per-second"),
        ("10/mins", 10, 60.0, "10-per-minute"),
        ("burst=10/second", 10, 1.0, "burst"),
        ("Daily = 1000 per day", 1000, 86400.0, "Daily"),
    ],
)
def test_policy_strings_parse_to_limit_window_and_name(
    text: str, limit: int, window: float, name: str
) -> None:
    policy = Policy.parse(text)
    assert (policy.limit, policy.window, policy.name) == (limit, window, name)
    assert policy.unit == "requests" and not policy.is_concurrency


def test_several_policies_split_on_semicolons_and_commas() -> None:
    policies = parse_policies("burst=10/second; daily=1000/day,5 per 10 seconds")
    assert [p.name for p in policies] == ["burst", "daily", "5-per-10s"]
    assert [p.window for p in policies] == [1.0, 86400.0, 10.0]


def test_concurrency_policies_have_no_window() -> None:
    policy = Policy.parse("slots=4 concurrent")
    assert (policy.limit, policy.window, policy.name) == (4, None, "slots")
    assert policy.is_concurrency and policy.unit == "concurrent-requests"
    assert Policy.parse("2 concurrent requests").name == "2-concurrent"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ten/second", "cannot parse"),
        ("10/fortnight", "unknown time unit"),
        ("0/second", ">= 1"),
        ("10/0 seconds", "at least 0.001"),
        ("bad name=10/second", "cannot parse"),
        ("", "no rate-limit policy"),
        (" ; ", "no rate-limit policy"),
    ],
)
def test_bad_policy_strings_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_policies(text)


def test_policy_constructor_validates_every_field() -> None:
    assert Policy(3, 1).name == "3-per-second"
    assert Policy(3, 1, burst=6).capacity == 6
    assert Policy(3, 1).capacity == 3
    assert Policy(3, 0.25).window_us == 250_000
    with pytest.raises(ValueError, match="needs a window"):
        Policy(3)
    with pytest.raises(ValueError, match="burst must be"):
        Policy(3, 1, burst=0)
    with pytest.raises(ValueError, match="has no window"):
        Policy(3, 1, unit="concurrent-requests")
    with pytest.raises(ValueError, match="must match"):
        Policy(3, 1, name='quote"me')
    with pytest.raises(ValueError, match=">= 1"):
        Policy(True, 1)


def test_as_policies_accepts_strings_policies_and_mixed_lists() -> None:
    burst = Policy(10, 1, name="burst")
    assert as_policies(burst) == (burst,)
    assert as_policies("burst=10/second") == (burst,)
    assert as_policies([burst, "daily=5/day"]) == (burst, Policy(5, 86400, name="daily"))


def test_names_must_be_distinct_within_one_check() -> None:
    with pytest.raises(ValueError, match="distinct"):
        as_policies("10/second;10/second")
    with pytest.raises(ValueError, match="at least one"):
        as_policies([])


def test_str_round_trips_through_the_parser() -> None:
    for policy in (Policy(5, 10, name="p"), Policy(4, name="c", unit="concurrent-requests")):
        assert Policy.parse(str(policy)) == policy


@pytest.mark.parametrize("window", [34_560_000.0, 0.25, 0.0012345, 86400.0])
def test_str_of_a_policy_parses_back_exactly(window: float) -> None:
    policy = Policy(5, window, name="p")
    assert Policy.parse(str(policy)) == policy
