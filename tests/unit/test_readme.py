"""The README stays true: every setting is documented, the two commands come first."""

from __future__ import annotations

from pathlib import Path

from app.core.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = [
        name.upper() for name in Settings.model_fields if f"| `{name.upper()}` |" not in README
    ]
    assert missing == []


def test_readme_opens_with_the_two_commands() -> None:
    head = "\n".join(README.splitlines()[:10])
    assert "make run" in head and "make test" in head
