"""HostConfig.to_env is the inverse of HostConfig.from_env: the environment a `signer host` process
is started with gives it exactly the configuration it was built from."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from broker.topics import TopicLayout
from signer.channel import ChannelSettings
from signer.config import ConfigError, HostConfig
from signer.pool import PoolSettings


def _non_default() -> HostConfig:
    return HostConfig(
        bootstrap="kafka-1:9092,kafka-2:9092",
        enclaves=["vsock://16:5000", "unix:///tmp/e1.sock?latency_ms=2"],
        group_id="g-test",
        layout=TopicLayout("a.req", "a.res", "a.dlq", "a.adm", "a.adm.rep", request_partitions=7, result_partitions=5),
        max_batch=77,
        http_host="0.0.0.0",
        http_port=0,
        pool=PoolSettings(
            connections_per_enclave=3,
            spill_after=17,
            poison_attempts=5,
            channel=ChannelSettings(
                max_batch=33, max_batch_bytes=65536, batch_window_s=0.002, heartbeat_interval_s=0.25, dead_after_s=1.5
            ),
        ),
        enclave_wait_s=7,
        shutdown_timeout_s=9,
        keystore="s3://signer-keys/prod?region=eu-west-1",
        preload_keys=0,
        default_keyring="ring",
        kms_credentials_file="/run/signer/creds.json",
        max_in_flight=321,
        resume_below=100,
        commit_interval_s=0.05,
        exactly_once=True,
        transactional_id="tx-1",
        transaction_timeout_ms=12_345,
        session_timeout_ms=7_000,
        rebalance_drain_s=3,
    )


def test_every_setting_in_the_test_differs_from_its_default() -> None:
    cfg, default = _non_default(), HostConfig.from_env(environ={})
    same = [f.name for f in fields(HostConfig) if getattr(cfg, f.name) == getattr(default, f.name)]
    assert not same, f"settings left at their default (the round trip would not test them): {same}"
    for name in ("connections_per_enclave", "spill_after", "poison_attempts"):
        assert getattr(cfg.pool, name) != getattr(default.pool, name), name
    for name in ("max_batch", "max_batch_bytes", "batch_window_s", "heartbeat_interval_s", "dead_after_s"):
        assert getattr(cfg.pool.channel, name) != getattr(default.pool.channel, name), name


def test_from_env_of_to_env_is_the_same_configuration() -> None:
    cfg = _non_default()
    assert HostConfig.from_env(environ=cfg.to_env()) == cfg


def test_a_process_environment_gives_the_same_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _non_default()
    for name, value in cfg.to_env().items():
        monkeypatch.setenv(name, value)
    assert HostConfig.from_env() == cfg


def test_defaults_round_trip_and_an_empty_transactional_id_is_left_to_the_process() -> None:
    cfg = replace(HostConfig.from_env(environ={}), transactional_id="")
    env = cfg.to_env()
    assert "SIGNER_TRANSACTIONAL_ID" not in env
    again = HostConfig.from_env(environ=env)
    assert again.transactional_id.startswith("signer-")
    assert replace(again, transactional_id="") == cfg


def test_what_no_variable_can_carry_is_refused_not_dropped() -> None:
    cfg = _non_default()
    with pytest.raises(ConfigError, match="SIGNER_BATCH_WINDOW_US"):
        replace(cfg, pool=replace(cfg.pool, channel=replace(cfg.pool.channel, batch_window_s=1.5e-7))).to_env()
    with pytest.raises(ConfigError, match="replication_factor"):
        replace(cfg, layout=replace(cfg.layout, replication_factor=3)).to_env()
    with pytest.raises(ConfigError, match="backoff_max_s"):
        replace(cfg, pool=replace(cfg.pool, backoff_max_s=9.0)).to_env()
