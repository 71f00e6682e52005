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
    ],
)
def test_an_out_of_bounds_authentication_setting_stops_the_enclave_at_start(
    name: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name, value)
    # the noop handler needs no configuration; the enclave stops before it listens
    code = main(["--handler", "noop", "--listen", f"unix://{tmp_path / 'e.sock'}"])
    assert code == 2
    assert name in capsys.readouterr().err
    assert not (tmp_path / "e.sock").exists()
