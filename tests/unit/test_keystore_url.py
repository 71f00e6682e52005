"""SIGNER_KEYSTORE: one URL chooses the key store; a bad one is a configuration error naming the
setting; SIGNER_KEYSTORE_DIR (deprecated) still names a directory store."""

from __future__ import annotations

import os

import pytest

from signer.config import ConfigError, HostConfig
from signer.keystore import StoreURL, parse_url


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("dir:///var/lib/signer/keystore", StoreURL("dir", "/var/lib/signer/keystore")),
        ("kafka://", StoreURL("kafka", "sign.keys")),
        ("kafka:///prod.sign.keys", StoreURL("kafka", "prod.sign.keys")),
        ("s3://signer-keys/prod/keys", StoreURL("s3", "signer-keys", "prod/keys")),
        ("s3://signer-keys?region=eu-west-1", StoreURL("s3", "signer-keys", "", {"region": "eu-west-1"})),
        (
            "dynamodb://signer-keys?endpoint=http://127.0.0.1:5000",
            StoreURL("dynamodb", "signer-keys", "", {"endpoint": "http://127.0.0.1:5000"}),
        ),
    ],
)
def test_each_backend_has_its_url(url: str, parsed: StoreURL) -> None:
    assert parse_url(url) == parsed


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("/var/lib/signer/keystore", "not a key store URL"),
        ("file:///tmp/x", "not a key store URL"),
        ("dir://relative/path", "absolute path"),
        ("dir:///", "absolute directory path"),
        ("kafka://broker-1:9092", "KAFKA_BOOTSTRAP"),
        ("kafka:///bad topic", "not a Kafka topic name"),
        ("s3://", "needs a bucket"),
        ("s3://Bad_Bucket/x", "not an S3 bucket name"),
        ("s3://bucket?colour=red", "unknown option"),
        ("dynamodb://table/extra", "nothing after it"),
    ],
)
def test_a_bad_url_is_a_config_error_naming_the_setting(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        HostConfig.from_env(environ={"SIGNER_KEYSTORE": url})
    assert str(err.value).startswith(f"SIGNER_KEYSTORE={url!r}: ") and why in str(err.value), err.value


def test_the_default_is_a_directory_in_the_users_data_dir() -> None:
    expected = "dir://" + os.path.expanduser("~/.local/share/enclave-signer/keystore")
    assert HostConfig.from_env(environ={}).keystore == expected


def test_the_deprecated_directory_setting_names_a_dir_store() -> None:
    cfg = HostConfig.from_env(environ={"SIGNER_KEYSTORE_DIR": "/srv/keys"})
    assert cfg.keystore == "dir:///srv/keys" and cfg.keystore_dir == "/srv/keys"
    assert HostConfig.from_env(environ=cfg.to_env()) == cfg  # hosts are started with SIGNER_KEYSTORE
    same = HostConfig.from_env(environ={"SIGNER_KEYSTORE_DIR": "/srv/keys", "SIGNER_KEYSTORE": "dir:///srv/keys"})
    assert same.keystore == "dir:///srv/keys"


def test_the_deprecated_setting_and_the_url_may_not_disagree() -> None:
    with pytest.raises(ConfigError, match=r"SIGNER_KEYSTORE_DIR='/srv/keys' .* disagree"):
        HostConfig.from_env(environ={"SIGNER_KEYSTORE_DIR": "/srv/keys", "SIGNER_KEYSTORE": "kafka://"})
