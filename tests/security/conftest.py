"""Fixtures shared by the security tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.security.hostile import Stage


@pytest.fixture
async def stage(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Stage]:
    """Dev KMS, two enclave worker processes and the honest host's parts; stopped after the test."""
    s = await Stage(tmp_path, sock_dir).start(enclaves=2)
    try:
        yield s
    finally:
        await s.stop()
