"""Settings the host hands the enclave through its environment are bounded: none can turn a check off."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclave_worker.__main__ import main


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ENCLAVE_AUTH_WINDOW_S", "nan"),  # abs(now - ts) > nan is always False: every request would be fresh
        ("ENCLAVE_AUTH_WINDOW_S", "inf"),
        ("ENCLAVE_AUTH_WINDOW_S", "0"),
        ("ENCLAVE_AUTH_WINDOW_S", "1e9"),
        ("ENCLAVE_REPLAY_CACHE", "0"),
        ("ENCLAVE_REPLAY_CACHE", "-1"),
        ("ENCLAVE_REPLAY_CACHE", "x"),
        # cache and wait bounds: none may be unbounded (a NaN unwrap timeout would make every wait endless)
        ("ENCLAVE_UNWRAP_TIMEOUT_S", "nan"),
        ("ENCLAVE_UNWRAP_TIMEOUT_S", "inf"),
        ("ENCLAVE_DEK_TTL_S", "nan"),
        ("ENCLAVE_DEK_CACHE_ENTRIES", "1e9"),
        ("ENCLAVE_MAX_CONCURRENT_UNWRAPS", "0"),
        ("ENCLAVE_MAX_KEYS", "100000000"),
        ("ENCLAVE_MAX_KEYS", "x"),
        ("ENCLAVE_MAX_KEY_BYTES", "99999999999"),
        ("ENCLAVE_MAX_OPEN_KEYS", "0"),
        ("ENCLAVE_CREDITS", "x"),  # was a traceback from argparse
        ("ENCLAVE_CREDITS", "10000000"),
        ("ENCLAVE_ID", "e" * 200),  # the host would refuse its HELLO: said at start instead
    ],
)
def test_an_out_of_bounds_setting_stops_the_enclave_at_start(
    name: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name, value)
    # the noop handler needs no configuration; the enclave stops before it listens
    code = main(["--handler", "noop", "--listen", f"unix://{tmp_path / 'e.sock'}"])
    assert code == 2
    assert name in capsys.readouterr().err
    assert not (tmp_path / "e.sock").exists()
