"""The key vault with real parts: dev KMS and enclave worker processes, the host's pool,
key manager and key store. Signatures are verified with eth-account."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eth_account import Account
from prometheus_client import generate_latest

from schemas.transport import Server, UnixTransport, transport_for
from signer.keys import KeyOpError
from tests.conftest import ROOT
from tests.enclaves import wait_until
from tests.rig import Rig, digest_req, recovered
from tests.transports import RecordingTransport


@pytest.fixture
async def rig(tmp_path: Path, sock_dir: Path) -> Any:
    r = await Rig(tmp_path, sock_dir).start()
    yield r
    await r.stop()


async def test_keys_survive_a_restart_of_every_process(tmp_path: Path, sock_dir: Path) -> None:
    rig = await Rig(tmp_path, sock_dir).start()
    try:
        key = await rig.create()
        before = await rig.sign([digest_req("r1", key["key_id"])])
        assert before[0]["status"] == "ok"
        kms_key_id = rig.kms_key_id
    finally:
        await rig.stop()
    rig = await Rig(tmp_path, sock_dir).start(kms_key_id=kms_key_id)  # same data: KMS state and key store
    try:
        req = digest_req("r2", key["key_id"])
        res = (await rig.sign([req]))[0]
        assert res["status"] == "ok", res
        assert recovered(req, res) == key["address"]
        assert rig.admin is not None
        listed = await rig.admin.list_keys()  # opened by an attested enclave, receipt verified
        assert [k["key_id"] for k in listed] == [key["key_id"]]
    finally:
        await rig.stop()


async def test_a_changed_enclave_image_is_refused_the_data_key(tmp_path: Path, sock_dir: Path) -> None:
    right = await Rig(tmp_path / "right", sock_dir).start()
    try:
        key = await right.create()
        req = digest_req("ok", key["key_id"])
        assert recovered(req, (await right.sign([req]))[0]) == key["address"]
        kms_key_id = right.kms_key_id
    finally:
        await right.stop()
    # the same project with one changed line in the enclave worker: a different image
    changed = tmp_path / "changed"
    for pkg in ("enclave_worker", "schemas"):
        shutil.copytree(ROOT / pkg, changed / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(changed / "enclave_worker" / "service.py", "a") as f:
        f.write("\n# a change an attacker or a careless build would make\n")
    shutil.copytree(tmp_path / "right" / "devkms", tmp_path / "wrong" / "devkms")
    shutil.copytree(tmp_path / "right" / "keystore", tmp_path / "wrong" / "keystore")
    wrong = await Rig(tmp_path / "wrong", sock_dir, pythonpath=str(changed)).start(kms_key_id=kms_key_id)
    try:
        res = (await wrong.sign([digest_req("denied", key["key_id"])]))[0]
        assert (res["status"], res["error"]["code"]) == ("error", "kms_access_denied"), res
        assert "signature" not in res
        stats = await wrong.kms_stats()
        assert stats["calls"].get("Decrypt", 0) >= 1  # it asked, and KMS said no
    finally:
        await wrong.stop()


async def test_concurrent_requests_unwrap_each_keyring_once(tmp_path: Path, sock_dir: Path) -> None:
    rig = await Rig(tmp_path, sock_dir, enclaves=2).start()
    try:
        keys = [await rig.create(keyring=f"ring{i % 5}") for i in range(50)]
        kms_key_id = rig.kms_key_id
    finally:
        await rig.stop()
    # fresh enclave processes: every data key cache is cold
    rig = await Rig(tmp_path, sock_dir, enclaves=2).start(kms_key_id=kms_key_id)
    try:
        await rig.kms_stats(reset=True)
        reqs = [digest_req(f"c{i}", keys[i % 50]["key_id"]) for i in range(1000)]
        results = await rig.sign(reqs)
        assert all(r["status"] == "ok" for r in results), [r for r in results if r["status"] != "ok"][:2]
        by_id = {k["key_id"]: k["address"] for k in keys}
        assert all(recovered(q, r) == by_id[q["key_id"]] for q, r in zip(reqs, results, strict=True))
        stats = await rig.kms_stats()
        assert stats["calls"].get("Decrypt", 0) <= 5, stats
        # steady state: another 1000 signatures need no KMS call at all
        await rig.kms_stats(reset=True)
        more = await rig.sign([digest_req(f"d{i}", keys[i % 50]["key_id"]) for i in range(1000)])
        assert all(r["status"] == "ok" for r in more)
        assert (await rig.kms_stats())["calls"] == {}
        # and the enclaves' own counters reach the host's /metrics
        await wait_until(lambda: b"signer_enclave_kms_decrypt_total" in generate_latest(rig.metrics.registry))
        text = generate_latest(rig.metrics.registry).decode()
        decrypts = sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("signer_enclave_kms_decrypt_total{"))  # fmt: skip
        assert decrypts == stats["calls"]["Decrypt"]
    finally:
        await rig.stop()


async def test_a_throttling_kms_delays_but_loses_nothing(tmp_path: Path, sock_dir: Path) -> None:
    rig = await Rig(tmp_path, sock_dir).start()
    try:
        keys = [await rig.create(keyring=f"t{i}") for i in range(3)]
        kms_key_id = rig.kms_key_id
    finally:
        await rig.stop()
    rig = await Rig(tmp_path, sock_dir).start(kms_key_id=kms_key_id)
    try:
        await rig.kms_stats(reset=True)
        await rig.throttle(6)
        reqs = [digest_req(f"t{i}", keys[i % 3]["key_id"]) for i in range(300)]
        results = await rig.sign(reqs)
        assert [r["status"] for r in results] == ["ok"] * 300
        stats = await rig.kms_stats()
        assert stats["throttled"] == 6
    finally:
        await rig.stop()


async def test_waiting_on_an_unwrap_past_the_deadline_expires(tmp_path: Path, sock_dir: Path) -> None:
    rig = await Rig(tmp_path, sock_dir).start()
    try:
        key = await rig.create()
        kms_key_id = rig.kms_key_id
    finally:
        await rig.stop()
    rig = await Rig(tmp_path, sock_dir).start(kms_key_id=kms_key_id)
    try:
        await rig.throttle(10_000)  # KMS throttles everything for now
        deadline = int(time.time() * 1000) + 400
        res = (await rig.sign([digest_req("late", key["key_id"], deadline_ms=deadline)]))[0]
        assert (res["status"], res["error"]["code"]) == ("expired", "deadline_passed")
        assert "signature" not in res
    finally:
        await rig.throttle(0)
        await rig.stop()


async def test_import_and_rotate_keep_the_key(rig: Rig) -> None:
    secret = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
    assert rig.backend is not None
    assert rig.admin is not None
    key = await rig.admin.import_key("secp256k1", "imported", secret)
    assert key["address"] == Account.from_key(secret).address
    other = await rig.create(keyring="imported")
    rotated = await rig.admin.rotate_dek("imported")
    assert (rotated["dek_version"], sorted(rotated["keys"])) == (2, sorted([key["key_id"], other["key_id"]]))
    assert {p.name for p in (rig.tmp / "keystore" / "imported").iterdir()} >= {
        "envelope.v1.msgpack",
        "envelope.v2.msgpack",
    }
    reqs = [digest_req("after", key["key_id"]), digest_req("other", other["key_id"])]
    res = await rig.sign(reqs)
    assert recovered(reqs[0], res[0]) == Account.from_key(secret).address
    assert recovered(reqs[1], res[1]) == other["address"]


async def test_no_plaintext_key_or_data_key_reaches_anything_the_host_sees(
    tmp_path: Path, sock_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    recorders: list[RecordingTransport] = []
    relays: list[Server] = []

    async def url_wrap(url: str) -> str:  # the host reaches each enclave through a recording proxy
        path = sock_dir / f"proxy{len(recorders)}.sock"
        recorders.append(RecordingTransport(transport_for(url)))
        relays.append(await recorders[-1].relay(UnixTransport(str(path))))
        return f"unix://{path}"

    rig = Rig(tmp_path, sock_dir, enclaves=2)
    await rig.start(url_wrap=url_wrap)
    try:
        secret = os.urandom(31) + b"\x01"
        assert rig.backend is not None
        assert rig.admin is not None
        key = await rig.admin.import_key("secp256k1", "default", secret)
        generated = await rig.create(scheme="ed25519")
        reqs = [digest_req(f"s{i}", key["key_id"]) for i in range(20)]
        reqs += [{"v": 1, "request_id": f"e{i}", "key_id": generated["key_id"], "scheme": "ed25519", "payload": b"m"}
                 for i in range(20)]  # fmt: skip
        assert all(r["status"] == "ok" for r in await rig.sign(reqs))
        # spread requests over both enclaves (route keys are only hashed), so the enclave that did
        # not create the keyring must unwrap it through KMS Decrypt
        spread = await rig.pool.submit_many([(f"spread{i}", msgpack.packb(r)) for i, r in enumerate(reqs)])  # type: ignore[union-attr]
        assert all(r["status"] == "ok" for r in spread)
        assert (await rig.kms_stats())["calls"].get("Decrypt", 0) >= 1
        await wait_until(lambda: b"signer_enclave_unwraps_total" in generate_latest(rig.metrics.registry))
        metrics = generate_latest(rig.metrics.registry)
        # the data key, recovered here from the dev KMS's own state (the test is the oracle)
        state = json.loads((tmp_path / "devkms" / "keys.json").read_text())
        material = base64.b64decode(state["keys"][rig.kms_key_id.rsplit("/", 1)[-1]]["material"])
        env = msgpack.unpackb((tmp_path / "keystore" / "default" / "envelope.v1.msgpack").read_bytes())
        blob = env["encrypted_dek"]
        n = blob[4]
        aad = json.dumps({"signer:dek_version": "1", "signer:keyring": "default"}, sort_keys=True,
                         separators=(",", ":")).encode() + blob[5 : 5 + n]  # fmt: skip
        dek = AESGCM(material).decrypt(blob[5 + n : 17 + n], blob[17 + n :], aad)
        assert len(dek) == 32
    finally:
        await rig.stop()
        for relay in relays:
            relay.close()
        for recorder in recorders:
            await recorder.aclose()
    out, err = capfd.readouterr()
    host_files = b"".join(p.read_bytes() for p in (tmp_path / "keystore").rglob("*") if p.is_file())
    logs = b"".join(p.read_bytes() for p in tmp_path.glob("*.log"))
    frames = b"".join(bytes(r.captured) for r in recorders)
    assert len(frames) > 10_000  # the proxy really saw the traffic
    seen = {"frames": frames, "metrics": metrics, "host files": host_files, "logs": logs,
            "host output": (out + err).encode()}  # fmt: skip
    for name, blob_ in seen.items():
        for secret_name, value in (("private key", secret), ("data key", dek)):
            for form in (value, value.hex().encode(), value.hex().upper().encode(), base64.b64encode(value)):
                assert form not in blob_, f"{secret_name} found in {name}"


async def test_enclaves_without_credentials_get_them_from_the_host(tmp_path: Path, sock_dir: Path) -> None:
    from tests.enclaves import DEV_CREDS

    # an enclave with no KMS credentials of its own cannot open a keyring...
    bare = await Rig(tmp_path / "bare", sock_dir, host_credentials={}).start()
    try:
        with pytest.raises(KeyOpError) as info:
            await bare.create()
        assert info.value.code == "kms_error", info.value
        assert "MissingAuthenticationToken" in info.value.message or "UnrecognizedClient" in info.value.message
    finally:
        await bare.stop()
    # ... until the host hands it the credentials it signs KMS requests with (as on Nitro)
    creds = {
        "access_key_id": DEV_CREDS["SIGNER_KMS_ACCESS_KEY_ID"],
        "secret_access_key": DEV_CREDS["SIGNER_KMS_SECRET_ACCESS_KEY"],
    }
    rig = await Rig(tmp_path / "pushed", sock_dir, host_credentials=creds).start()
    try:
        key = await rig.create()
        req = digest_req("with-pushed-creds", key["key_id"])
        assert recovered(req, (await rig.sign([req]))[0]) == key["address"]
    finally:
        await rig.stop()
