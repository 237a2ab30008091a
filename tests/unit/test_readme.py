"""The README stays a true front door, and the documentation covers every setting."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _docs_hooks() -> Any:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_is_in_the_configuration_table() -> None:
    hooks = _docs_hooks()
    table = hooks.settings_table()
    missing = [
        name.upper() for name in Settings.model_fields if f"| `{name.upper()}` |" not in table
    ]
    assert missing == []
    assert hooks.MARKER in (ROOT / "docs" / "configuration.md").read_text()


def test_readme_opens_with_the_two_commands() -> None:
    head = "\n".join(README.splitlines()[:10])
    assert "make run" in head and "make test" in head


def test_readme_stays_short() -> None:
    assert len(README.encode()) <= 12 * 1024


def test_readme_links_reach_existing_pages() -> None:
    targets = re.findall(r"\]\((docs/[^)#]+)", README)
    assert targets
    assert [t for t in targets if not (ROOT / t).is_file()] == []
