"""Benchmark groups: each module exports ``cases() -> list[Case]``."""
