"""One hostile record from any producer does not stall the cluster.

Through the public path: a real host worker process, real Kafka and enclave workers. A ~250 KB
EIP-712 document built to make type parsing expensive goes onto `sign.requests`, and ordinary
digest requests for another key right behind it. The hostile request is refused (by the key's
policy before any parsing, or by the typed-data caps) and the ordinary ones are answered
promptly, not after the hostile one has held an enclave's event loop.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from signer.topology import Topology
from tests.integration.test_host import ResultReader, check_signed, cluster, produce  # noqa: F401

DIGESTS = 50
PROMPT_S = 10.0  # before the enclave's checks and caps, the ordinary requests waited ~44 s


def hostile_typed_data(target_bytes: int = 240_000) -> dict[str, Any]:
    """One field whose type nests arrays ~120,000 deep: resolving it one level at a time, with the
    depth limit checked only afterwards, is quadratic in the type string."""
    nested = "uint256" + "[]" * ((target_bytes - 7) // 2)
    types = {"EIP712Domain": [{"name": "name", "type": "string"}, {"name": "chainId", "type": "uint256"}],
             "Mail": [{"name": "contents", "type": nested}]}  # fmt: skip
    return {"types": types, "primaryType": "Mail", "domain": {"name": "x", "chainId": 1}, "message": {"contents": []}}


async def test_a_hostile_typed_data_record_does_not_stall_the_cluster(cluster: Topology) -> None:  # noqa: F811
    await cluster.start_host("h")
    operator = cluster.operator()
    client = {"payments": {"scheme": "ed25519", "public_key": "11" * 32}}
    guarded = await operator.create_key("secp256k1", "r0", {"schemes": ["eth_tx"], "require_auth": True,
                                                              "clients": client})  # fmt: skip
    open_key = await operator.create_key("secp256k1", "r1")  # no policy: only the caps protect it
    ordinary = await operator.create_key("secp256k1", "r2")
    doc = hostile_typed_data()
    # same keyring as the ordinary key: requests route by keyring, so they share its enclave
    hostile = [{"v": 1, "request_id": f"hostile-{i}-{k['key_id']}", "key_id": k["key_id"], "scheme": "eth_typed_data",
                "payload": doc} for k in (guarded, open_key) for i in range(3)]  # fmt: skip
    assert all(len(msgpack.packb(h)) < 256 * 1024 for h in hostile)  # accepted at intake
    digests = [{"v": 1, "request_id": f"d{i}", "key_id": ordinary["key_id"], "scheme": "secp256k1_digest",
                "payload": bytes([i]) * 32} for i in range(DIGESTS)]  # fmt: skip
    async with ResultReader(cluster.bootstrap, cluster.layout.results) as reader:
        t0 = time.monotonic()
        await produce(cluster.bootstrap, cluster.layout.requests,
                      [(r["key_id"].encode(), msgpack.packb(r)) for r in hostile + digests])  # fmt: skip
        await reader.wait_for({r["request_id"] for r in digests + hostile}, timeout=120)
        elapsed = time.monotonic() - t0
    check_signed(digests, [ordinary], reader.by_id)
    refused = {h["request_id"]: reader.by_id[h["request_id"]][0] for h in hostile}
    assert all(r["status"] != "ok" for r in refused.values())
    guarded_res = refused[f"hostile-0-{guarded['key_id']}"]
    assert (guarded_res["status"], guarded_res["error"]["code"]) == ("rejected", "policy_scheme"), guarded_res
    open_res = refused[f"hostile-0-{open_key['key_id']}"]
    assert open_res["status"] in ("rejected", "error") and open_res["error"]["code"].startswith(
        ("typed_data_", "invalid_typed_data")
    ), open_res
    assert elapsed < PROMPT_S, f"the ordinary requests took {elapsed:.1f}s behind one hostile record"
