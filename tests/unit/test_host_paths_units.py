"""Pure pieces of the host paths tested end to end in tests/integration/test_host_paths.py:
SIGNER_CONFIG_FILE parsing and precedence, the KMS credentials file, the backpressure rule for
newly assigned partitions (behind the consumer seam), and the enclave's bounded replay cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from enclave_worker import auth
from enclave_worker.auth import ReplayCache
from schemas.refusals import Refused
from signer.backpressure import Backpressure
from signer.config import ConfigError, HostConfig
from signer.credentials import kms_credentials
from signer.metrics import HostMetrics

# -- SIGNER_CONFIG_FILE ------------------------------------------------------------------------------


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "signer.toml"
    path.write_text(text)
    return str(path)


def test_settings_come_from_the_file_and_the_environment_wins(tmp_path: Path) -> None:
    path = _file(tmp_path, 'SIGNER_GROUP_ID = "from-file"\nSIGNER_MAX_IN_FLIGHT = 777\n'
                           'SIGNER_EXACTLY_ONCE = true\nSIGNER_TOPIC_RESULTS = "file.results"\n')  # fmt: skip
    cfg = HostConfig.from_env(environ={"SIGNER_CONFIG_FILE": path, "SIGNER_TOPIC_RESULTS": "env.results"})
    assert cfg.group_id == "from-file" and cfg.max_in_flight == 777 and cfg.resume_below == 777 // 2
    assert cfg.exactly_once is True  # a TOML boolean
    assert cfg.layout.results == "env.results"  # the environment wins over the file


def test_a_file_leaves_nothing_behind_for_the_next_configuration(tmp_path: Path) -> None:
    """Found by this test: file values were kept in a module-level dict, so every later
    HostConfig.from_env in the process - even one given an explicit environment without
    SIGNER_CONFIG_FILE - silently took them (a test loading a file changed other tests' defaults)."""
    path = _file(tmp_path, "SIGNER_MAX_IN_FLIGHT = 321\n")
    assert HostConfig.from_env(environ={"SIGNER_CONFIG_FILE": path}).max_in_flight == 321
    assert HostConfig.from_env(environ={}).max_in_flight == 10_000


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('SIGNER_GROUP_ID = "g"\nSIGNER_MAX_BATCH 5\n', ["line 2"]),  # not TOML
        ("[SIGNER_GROUP_ID]\nx = 1\n", ["SIGNER_GROUP_ID", "must be a string, number or boolean"]),
        ('SIGNER_MAX_INFLIGHT = 5\nSIGNER_GROUP_ID = "g"\n', ["not a host setting", "SIGNER_MAX_INFLIGHT"]),
        ('SIGNER_MAX_IN_FLIGHT = "lots"\n', ["SIGNER_MAX_IN_FLIGHT='lots' is not an integer", "set in"]),
        ("SIGNER_EXACTLY_ONCE = 2\n", ["SIGNER_EXACTLY_ONCE='2' is not a boolean", "set in"]),
    ],
    ids=["not-toml", "a-table", "misspelt-name", "bad-integer", "bad-boolean"],
)
def test_a_bad_file_is_one_error_naming_the_file_and_the_problem(tmp_path: Path, text: str, names: list[str]) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        HostConfig.from_env(environ={"SIGNER_CONFIG_FILE": path})
    message = str(info.value)
    assert f"SIGNER_CONFIG_FILE={path}" in message, message
    for name in names:
        assert name in message, message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=f"SIGNER_CONFIG_FILE={path}: .*No such file"):
        HostConfig.from_env(environ={"SIGNER_CONFIG_FILE": path})


def test_a_bad_value_in_the_environment_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "SIGNER_MAX_IN_FLIGHT = 50\n")
    with pytest.raises(ConfigError) as info:
        HostConfig.from_env(environ={"SIGNER_CONFIG_FILE": path, "SIGNER_MAX_IN_FLIGHT": "x"})
    assert "SIGNER_MAX_IN_FLIGHT='x' is not an integer" in str(info.value)
    assert "set in" not in str(info.value)


# -- SIGNER_KMS_CREDENTIALS_FILE -------------------------------------------------------------------------


def test_the_credentials_file_is_read_again_on_every_call(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"AccessKeyId": "ASIA1", "SecretAccessKey": "s1", "Token": "t1"}))
    assert kms_credentials(str(path)) == {"access_key_id": "ASIA1", "secret_access_key": "s1", "session_token": "t1"}
    path.write_text(json.dumps({"AccessKeyId": "AKIA2", "SecretAccessKey": "s2"}))  # rotated, no token
    assert kms_credentials(str(path)) == {"access_key_id": "AKIA2", "secret_access_key": "s2"}
    # the file wins over the environment's credentials
    env = {"SIGNER_KMS_ACCESS_KEY_ID": "envkey", "SIGNER_KMS_SECRET_ACCESS_KEY": "envsecret"}
    assert kms_credentials(str(path), env)["access_key_id"] == "AKIA2"  # type: ignore[index]
    assert kms_credentials("", env) == {"access_key_id": "envkey", "secret_access_key": "envsecret"}
    assert kms_credentials("", {}) is None


@pytest.mark.parametrize("text", [None, "{not json", '{"AccessKeyId": "A"}', "[1, 2]"],
                         ids=["missing", "not-json", "no-secret", "not-an-object"])  # fmt: skip
def test_an_unreadable_credentials_file_hands_nothing_over(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "creds.json"
    if text is not None:
        path.write_text(text)
    assert kms_credentials(str(path)) is None  # the enclaves keep what they had


# -- backpressure and newly assigned partitions (the consumer is the seam) ---------------------------


class _Consumer:
    """The three consumer calls Backpressure makes, recorded."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned, self.paused_set = set(assigned), set[TopicPartition]()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_set |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_set -= set(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_set)


def _tps(*ps: int) -> list[TopicPartition]:
    return [TopicPartition("req", p) for p in ps]


def test_partitions_assigned_while_paused_stay_paused_until_in_flight_falls() -> None:
    consumer = _Consumer(set(_tps(0, 1)))
    bp = Backpressure(consumer, max_in_flight=100, resume_below=40, metrics=HostMetrics())  # type: ignore[arg-type]
    assert bp.room(10) == 90 and not consumer.paused_set
    assert bp.room(100) == 1 and consumer.paused_set == set(_tps(0, 1))
    # a rebalance: new assignment objects, the consumer forgets the pause; the listener re-applies it
    consumer.assigned, consumer.paused_set = set(_tps(0, 2, 3)), set()
    bp.assigned(_tps(0, 2, 3))
    assert consumer.paused_set == set(_tps(0, 2, 3))
    assert bp.room(41) == 59 and consumer.paused_set == set(_tps(0, 2, 3))  # above the low watermark: still paused
    assert bp.room(40) == 60 and not consumer.paused_set  # released: every partition resumes


def test_partitions_assigned_while_not_paused_are_left_alone() -> None:
    consumer = _Consumer(set(_tps(0)))
    bp = Backpressure(consumer, max_in_flight=100, resume_below=40, metrics=HostMetrics())  # type: ignore[arg-type]
    bp.room(99)
    bp.assigned(_tps(1))
    assert not consumer.paused_set


# -- the enclave's replay cache ---------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _nonce(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_a_nonce_is_refused_for_another_request_within_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(auth.time, "monotonic", clock)  # the cache's clock
    cache = ReplayCache(capacity=100, window_s=300)
    assert cache.check("c", _nonce(1), b"req-a") is None
    clock.now += 299
    assert cache.check("c", _nonce(1), b"req-a") is not None  # the same request again: a redelivery
    with pytest.raises(Refused) as info:
        cache.check("c", _nonce(1), b"req-b")
    assert info.value.code == "auth_replayed"
    assert cache.check("other-client", _nonce(1), b"req-b") is None  # nonces are per client
    clock.now += 2  # past the window: forgotten (the freshness check refuses the old ts_ms by then)
    assert cache.check("c", _nonce(1), b"req-b") is None


def test_the_cache_stays_bounded_under_many_distinct_nonces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by this test: the cache evicted down to `capacity` before adding, so it held
    capacity + 1 nonces (ENCLAVE_REPLAY_CACHE=4 held 5)."""
    monkeypatch.setattr(auth.time, "monotonic", _Clock())  # nothing expires: only the bound evicts
    cache = ReplayCache(capacity=64, window_s=300)
    peak = 0
    for i in range(10_000):
        cache.check("c", _nonce(i), b"r%d" % i)
        peak = max(peak, len(cache))
    assert peak == 64
    # the newest 64 are remembered (a replay among them is refused), the oldest were let go first
    with pytest.raises(Refused):
        cache.check("c", _nonce(10_000 - 64), b"another")
    assert cache.check("c", _nonce(0), b"another") is None


def test_a_replay_cache_of_size_zero_still_holds_the_request_it_checks() -> None:
    authenticator: Any = auth.Authenticator(window_s=300, replay_capacity=0)
    assert authenticator.replays.capacity == 1
