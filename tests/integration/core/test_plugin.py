"""The pytest plugin itself: REDIS_REQUIRED=1 turns a missing server into a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TEST_FILE = """
def test_needs_redis(redis_server):
    assert redis_server.url
"""


def run_pytest(tmp_path: Path, *, required: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["app.testing.plugin"]\n')
    (tmp_path / "test_needs_redis.py").write_text(TEST_FILE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_REQUIRED")}
    env["PATH"] = str(empty_bin)  # no redis-server anywhere on PATH
    env["DOCKER_HOST"] = f"unix://{tmp_path}/no-docker.sock"
    if required:
        env["REDIS_REQUIRED"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_required_without_a_server_fails_loudly(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, required=True)
    assert result.returncode != 0, result.stdout
    assert "REDIS_REQUIRED=1 but no real Redis could be found" in result.stdout
    assert "apt-get install redis-server" in result.stdout


def test_without_required_the_test_is_skipped_with_one_reason(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, required=False)
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
    assert "integration tests need a real Redis" in result.stdout
