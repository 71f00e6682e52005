"""The one rule for keyring names and key ids, wherever they are read: admin requests, the
enclave's key operations, the records it loads, and the host's key store."""

from __future__ import annotations

import string
from typing import Any

NAME_RULE = "1-64 ASCII letters, digits, '-' or '_'"
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_")


def valid_name(value: Any) -> bool:
    """True if ``value`` is a keyring name or key id: a str of NAME_RULE."""
    return type(value) is str and 1 <= len(value) <= 64 and set(value) <= _NAME_CHARS
