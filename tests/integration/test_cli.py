"""The README's commands: the main job (`signer demo`), `signer up` + `signer keys create`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from eth_account import Account

from broker.local_kafka import api_versions_ok, free_port, metadata
from signer.topology import ChildProcess
from tests.conftest import ROOT

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "SIGNER_"))}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signer", *args],
        env={**CLEAN_ENV, "PYTHONPATH": str(ROOT), "SIGNER_HTTP_PORT": "0", **(env or {})},
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )  # fmt: skip


def test_main_job_signs_verifies_and_exits_zero() -> None:
    out = run_cli("demo", "-n", "80")
    assert out.returncode == 0, out.stdout + out.stderr
    for scheme in ("secp256k1_digest", "eth_tx", "eth_personal", "ed25519"):
        assert f"{scheme:18} verified   20  failed 0" in out.stdout, out.stdout
    assert "/metrics" in out.stdout


def test_up_serves_outside_producers_and_keys_create_reaches_it(tmp_path: Path) -> None:
    up = ChildProcess("signer", ["up"], {**CLEAN_ENV, "SIGNER_HTTP_PORT": "0", "SIGNER_DATA_DIR": str(tmp_path / "data")},
                      log=tmp_path / "up.log").spawn()  # fmt: skip
    try:
        line = up.wait_for_line("KAFKA_BOOTSTRAP=", timeout=180)
        bootstrap = line.split("=", 1)[1].strip()
        host, port = bootstrap.rsplit(":", 1)
        assert api_versions_ok(host, int(port))
        # `up` prints the dev operator's settings for `signer keys ...` as export lines
        env = {"KAFKA_BOOTSTRAP": bootstrap}
        for name in ("SIGNER_OPERATOR_KEY", "SIGNER_ATTESTATION_ROOT", "SIGNER_EXPECT_PCR0"):
            env[name] = up.wait_for_line(f"export {name}=", timeout=10).split("=", 1)[1].strip()
        out = run_cli("keys", "create", "--scheme", "secp256k1", env=env)
        assert out.returncode == 0, out.stderr
        key = json.loads(out.stdout)
        assert key["address"].startswith("0x") and len(bytes.fromhex(key["public_key"])) == 65
        assert key["verified"] is True and key["pcr0"] == env["SIGNER_EXPECT_PCR0"]
        listed = json.loads(run_cli("keys", "list", env=env).stdout)
        assert [k["key_id"] for k in listed["keys"]] == [key["key_id"]]
        # import a known key, encrypted to the attested enclave by the CLI; then rotate the keyring's DEK
        secret = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
        (tmp_path / "key.hex").write_text(secret + "\n")
        out = run_cli("keys", "import", "--key-file", str(tmp_path / "key.hex"), "--keyring", "imported", env=env)
        assert out.returncode == 0, out.stderr
        imported = json.loads(out.stdout)
        assert imported["address"] == Account.from_key(secret).address
        assert secret[2:] not in out.stdout + out.stderr
        wrong = run_cli("keys", "import", "--key-file", str(tmp_path / "key.hex"), "--expect-pcr0", "ab" * 48,
                        env=env)  # fmt: skip
        assert wrong.returncode == 2 and "not the expected" in wrong.stderr, wrong.stderr
        rotated = run_cli("keys", "rotate-dek", "--keyring", "imported", env=env)
        assert rotated.returncode == 0, rotated.stderr
        summary = json.loads(rotated.stdout)
        assert (summary["keyring"], summary["dek_version"], summary["keys"]) == ("imported", 2, [imported["key_id"]])
    finally:
        code = up.stop(signal.SIGINT, timeout=60)
    assert code == 0
    assert "stopped" in up.output
    assert not api_versions_ok(host, int(port))  # the Kafka it started is gone too


def test_keys_create_without_a_cluster_says_what_to_do() -> None:
    out = run_cli("keys", "create", timeout=30)
    assert out.returncode == 2
    assert "KAFKA_BOOTSTRAP is not set" in out.stderr and "signer up" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_configuration_is_one_line_naming_the_variable() -> None:
    out = run_cli("host", env={"KAFKA_BOOTSTRAP": "127.0.0.1:1", "SIGNER_MAX_BATCH": "lots"}, timeout=30)
    assert out.returncode == 2
    assert "SIGNER_MAX_BATCH='lots' is not an integer" in out.stderr and "Traceback" not in out.stderr


def test_a_second_up_on_the_same_data_dir_or_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    port = free_port()
    first = ChildProcess("signer", ["up"], {**CLEAN_ENV, "SIGNER_HTTP_PORT": str(port),
                         "SIGNER_DATA_DIR": str(tmp_path / "a")}, log=tmp_path / "first.log").spawn()  # fmt: skip
    others: list[ChildProcess] = []
    try:
        first.wait_for_line("KAFKA_BOOTSTRAP=", timeout=180)  # announced: everything it started serves
        cases = {
            "same-dir": ({"SIGNER_HTTP_PORT": "0", "SIGNER_DATA_DIR": str(tmp_path / "a")}, "SIGNER_DATA_DIR="),
            "same-port": ({"SIGNER_HTTP_PORT": str(port), "SIGNER_DATA_DIR": str(tmp_path / "b")}, "SIGNER_HTTP_PORT="),
        }
        for name, (env, names) in cases.items():
            second = ChildProcess("signer", ["up"], {**CLEAN_ENV, **env}, log=tmp_path / f"{name}.log").spawn()
            others.append(second)
            assert second.wait(timeout=60) == 2, name
            lines = (tmp_path / f"{name}.log").read_text().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"signer: {names}"), (name, lines)
            assert not any(line.startswith("KAFKA_BOOTSTRAP=") for line in second.output), second.output
        assert first.running  # the first cluster is untouched ...
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            assert r.status == 200  # ... and still serves
    finally:
        for proc in others:
            proc.stop()
        assert first.stop(signal.SIGINT, timeout=60) == 0


def test_up_with_three_brokers_replicates_the_topics_and_stops_every_node(tmp_path: Path) -> None:
    """`signer up --brokers 3`: a three-node Kafka, every topic with three replicas and
    min.insync.replicas=2, `signer keys create` through it, and every node gone after Ctrl-C."""
    up = ChildProcess("signer", ["up", "--brokers", "3"], {**CLEAN_ENV, "SIGNER_HTTP_PORT": "0",
                      "SIGNER_DATA_DIR": str(tmp_path / "data")}, log=tmp_path / "up.log").spawn()  # fmt: skip
    addresses: list[tuple[str, int]] = []
    try:
        bootstrap = up.wait_for_line("KAFKA_BOOTSTRAP=", timeout=180).split("=", 1)[1].strip()
        addresses = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in bootstrap.split(","))]
        assert len(addresses) == 3 and all(api_versions_ok(h, p) for h, p in addresses), bootstrap
        md = metadata(*addresses[0], ["sign.requests", "sign.results", "sign.admin"])
        assert md is not None and set(md.brokers) == {1, 2, 3}
        for topic, parts in md.topics.items():
            assert parts and all(len(s.replicas) == 3 for s in parts.values()), (topic, parts)
        assert asyncio.run(_min_insync(bootstrap, "sign.requests")) == "2"
        env = {"KAFKA_BOOTSTRAP": bootstrap}
        for name in ("SIGNER_OPERATOR_KEY", "SIGNER_ATTESTATION_ROOT", "SIGNER_EXPECT_PCR0"):
            env[name] = up.wait_for_line(f"export {name}=", timeout=10).split("=", 1)[1].strip()
        out = run_cli("keys", "create", env=env)
        assert out.returncode == 0 and json.loads(out.stdout)["verified"] is True, out.stderr
    finally:
        code = up.stop(signal.SIGINT, timeout=60)
    assert code == 0 and "stopped" in up.output
    assert not any(api_versions_ok(h, p) for h, p in addresses)  # every node it started is gone


async def _min_insync(bootstrap: str, topic: str) -> str:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    return str({c[0]: c[1] for c in responses[0].resources[0][4]}["min.insync.replicas"])


def test_up_brokers_is_refused_with_an_outside_kafka_or_below_one(tmp_path: Path) -> None:
    env = {"KAFKA_BOOTSTRAP": "127.0.0.1:1", "SIGNER_DATA_DIR": str(tmp_path / "data")}
    out = run_cli("up", "--brokers", "3", env=env, timeout=30)
    assert out.returncode == 2 and "KAFKA_BOOTSTRAP is set" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "KAFKA_BOOTSTRAP=" not in out.stdout
    out = run_cli("up", "--brokers", "0", timeout=30)
    assert out.returncode == 2 and "--brokers must be at least 1" in out.stderr, out.stderr
