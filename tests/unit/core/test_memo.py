"""``BoundedMemo``: remembered answers, never more than the bound."""

from __future__ import annotations

import pytest

from app.core.memo import BoundedMemo


def test_remembers_answers_and_returns_what_it_stored() -> None:
    memo: BoundedMemo[str, int] = BoundedMemo(4)
    assert memo.get("a") is None and memo.get("a", -1) == -1
    assert memo.put("a", 1) == 1
    assert memo.get("a") == 1 and "a" in memo and len(memo) == 1
    assert memo.pop("a") == 1 and memo.pop("a", 0) == 0 and "a" not in memo


def test_a_full_memo_forgets_everything_before_remembering_a_new_key() -> None:
    memo: BoundedMemo[int, int] = BoundedMemo(3)
    for n in range(3):
        memo.put(n, n)
    memo.put(1, 10)  # replacing a remembered key is no growth: nothing is forgotten
    assert [memo.get(n) for n in range(3)] == [0, 10, 2]
    memo.put(3, 3)
    assert len(memo) == 1 and memo.get(0) is None and memo.get(3) == 3


def test_a_flood_of_distinct_keys_never_grows_it_past_the_bound() -> None:
    memo: BoundedMemo[int, int] = BoundedMemo(100)
    for n in range(10_000):
        memo.put(n, n)
        assert len(memo) <= 100
    assert memo.get(9_999) == 9_999  # the latest answer is always kept


def test_get_stays_bound_to_the_live_entries_after_clear() -> None:
    memo: BoundedMemo[str, str] = BoundedMemo(2)
    get = memo.get
    memo.put("k", "v")
    memo.clear()
    assert get("k") is None and len(memo) == 0
    memo.put("k", "w")
    assert get("k") == "w"


def test_refuses_a_bound_below_one() -> None:
    with pytest.raises(ValueError, match="maxsize >= 1"):
        BoundedMemo(0)
