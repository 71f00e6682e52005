"""KeyView, the rule every key store backend computes: a pure unit, checked on its own."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.records import KeyringEnvelope, SealedKey
from signer.keystore import KeyView, dek_tag


def env(ring: str, version: int) -> KeyringEnvelope:
    return KeyringEnvelope(ring, "arn:aws:kms:us-east-1:111122223333:key/k", version, os.urandom(32), 1)


def key(ring: str, version: int, key_id: str) -> SealedKey:
    return SealedKey(key_id, ring, version, "ed25519", os.urandom(32), None, os.urandom(12), os.urandom(48), 1)


def snapshot(view: KeyView) -> tuple[list[object], list[object]]:
    return (sorted((e.keyring_id, e.dek_version, e.encrypted_dek) for e in view.envelopes()),
            sorted((k.keyring_id, k.key_id, k.dek_version, k.nonce) for k in view.keys()))  # fmt: skip


def test_the_first_envelope_of_a_version_wins_and_the_highest_version_is_current() -> None:
    view = KeyView()
    first, second, later = env("r", 1), env("r", 1), env("r", 2)
    assert view.add_envelope(first) is first
    assert view.add_envelope(second) is first  # the second creator learns it lost
    assert view.get_envelope("r") is first
    view.add_envelope(later)
    assert view.get_envelope("r") is later and view.envelope_version("r", 1) is first


def test_keys_count_only_under_the_winning_data_key_of_the_current_version() -> None:
    view = KeyView()
    winner, loser = env("r", 1), env("r", 1)
    view.add_envelope(winner)
    mine, theirs, untagged = key("r", 1, "k_01"), key("r", 1, "k_01"), key("r", 1, "k_02")
    view.add_key(theirs, dek_tag(loser))
    view.add_key(mine, dek_tag(winner))
    view.add_key(untagged)  # a legacy directory record names no data key: its version's winner
    assert view.get_key("k_01") is mine and view.get_key("k_02") is untagged
    assert {k.key_id for k in view.keys()} == {"k_01", "k_02"}
    v2 = env("r", 2)
    resealed = key("r", 2, "k_01")
    view.add_key(resealed, dek_tag(v2))  # keys first, as a rotation stores them
    assert view.get_key("k_01") is mine
    view.add_envelope(v2)
    assert view.get_key("k_01") is resealed and view.get_key("k_02") is None
    view.add_key(key("r", 1, "k_03"))  # sealed under a version the keyring has moved past
    assert view.get_key("k_03") is None


@settings(max_examples=50, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 3), st.integers(1, 3))
def test_the_view_does_not_depend_on_the_order_records_are_listed_in(rnd: object, rings: int, versions: int) -> None:
    """Directory, S3 and DynamoDB stores list records in no particular order (one envelope per version)."""
    records: list[tuple[str, object, str]] = []
    for r in range(rings):
        for v in range(1, versions + 1):
            e = env(f"r{r}", v)
            records.append(("env", e, ""))
            records += [("key", key(f"r{r}", v, f"k_{r}{i}"), dek_tag(e)) for i in range(3)]
    views = []
    for _ in range(2):
        order = list(records)
        rnd.shuffle(order)  # type: ignore[attr-defined]
        view = KeyView()
        for kind, record, tag in order:
            if kind == "env":
                view.add_envelope(record)  # type: ignore[arg-type]
            else:
                view.add_key(record, tag)  # type: ignore[arg-type]
        views.append(snapshot(view))
    assert views[0] == views[1]
    assert len(views[0][1]) == 3 * rings
