"""The key store on AWS: S3 objects (`s3://BUCKET/PREFIX`) or DynamoDB items (`dynamodb://TABLE`).

Both create a keyring version exclusively with a conditional write - S3 `If-None-Match: *`,
DynamoDB `ConditionExpression attribute_not_exists(pk)` - so of two hosts creating one keyring
version the second gets KeyringConflict. A sealed key's name carries the tag of the data key it is
sealed under (signer/keystore.py, `dek_tag`), as in the Kafka store, so a racing rotation's losing
keys never replace the winner's.

    S3:        PREFIX/<keyring>/envelope.v<N>.msgpack
               PREFIX/<keyring>/keys/<key_id>.v<N>.<tag>.msgpack
    DynamoDB:  item pk "e/<keyring>/<N>" or "k/<keyring>/<N>/<tag>/<key_id>", the record in `record` (B)

botocore's synchronous clients run in a thread pool the store owns, rather than aiobotocore:
botocore is already the project's AWS dependency (SigV4 for KMS), aiobotocore pins botocore to a
narrow range of its own (so the two would move in lock-step), and the store is off the signing
path - it is read at start, on an unknown key and when a key is created. Clients are thread-safe;
the pool bounds how many requests run at once. Credentials and region come from the usual AWS
sources (environment, instance role); `?region=` and `?endpoint=` in the URL override them.

The bucket or table must exist: the store never creates one (DynamoDB: partition key `pk`, type S).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from schemas.records import KeyringEnvelope, SealedKey

from .keystore import (
    UNDECODABLE,
    KeyringConflict,
    KeyStoreError,
    ViewedKeyStore,
    check_ids,
    dek_tag,
    encode,
    stored_envelope,
    stored_key,
)

T = TypeVar("T")

_S3_ENVELOPE = re.compile(r"^([^/]{1,64})/envelope\.v(\d+)\.msgpack$")
_S3_KEY = re.compile(r"^([^/]{1,64})/keys/(k_[0-9a-f]+)\.v(\d+)\.([0-9a-f]{16})\.msgpack$")
_DDB_ENVELOPE = re.compile(r"^e/([^/]{1,64})/(\d+)$")
_DDB_KEY = re.compile(r"^k/([^/]{1,64})/(\d+)/([0-9a-f]{16})/(k_[0-9a-f]+)$")


def _client(service: str, region: str | None, endpoint: str | None, pool: int) -> Any:
    session = botocore.session.get_session()
    config = Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=pool,
                    connect_timeout=5, read_timeout=30)  # fmt: skip
    return session.create_client(service, region_name=region or session.get_config_variable("region"),
                                 endpoint_url=endpoint, config=config)  # fmt: skip


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class _AwsKeyStore(ViewedKeyStore):
    service = ""

    def __init__(self, region: str | None, endpoint: str | None, workers: int) -> None:
        super().__init__()
        self.region, self.endpoint, self.workers = region, endpoint, workers
        self.client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._seen: dict[str, object] = {}  # name -> ETag / bytes already applied to the view

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        if self._pool is None:
            raise KeyStoreError(f"{self.url}: not started")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kw))

    async def _all(self, fn: Callable[..., T], items: Iterable[Any]) -> list[T]:
        return list(await asyncio.gather(*(self._call(fn, item) for item in items)))

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"keystore-{self.service}")
        try:
            self.client = await self._call(_client, self.service, self.region, self.endpoint, self.workers)
            await self._check()
            await self.refresh()
        except (BotoCoreError, ClientError) as exc:
            await self.close()
            raise KeyStoreError(f"{self.url}: {exc}") from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self.client is not None:
            self.client.close()
            self.client = None

    async def _check(self) -> None:
        raise NotImplementedError

    async def refresh(self) -> None:
        raise NotImplementedError


class S3KeyStore(_AwsKeyStore):
    service = "s3"

    def __init__(self, bucket: str, prefix: str = "", *, region: str | None = None, endpoint: str | None = None,
                 workers: int = 16) -> None:  # fmt: skip
        super().__init__(region, endpoint, workers)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}"
        self._root = f"{self.prefix}/" if self.prefix else ""

    async def _check(self) -> None:
        try:
            await self._call(self.client.head_bucket, Bucket=self.bucket)
        except ClientError as exc:
            what = f"bucket {self.bucket} is not there or not readable ({_code(exc)})"
            raise KeyStoreError(f"{self.url}: {what}") from None

    async def refresh(self) -> None:
        """List the prefix; fetch the objects not seen yet (or changed) and add them to the view."""
        try:
            listed = await self._call(self._list)
            fresh = [(name, etag) for name, etag in listed if self._seen.get(name) != etag]
            bodies = await self._all(self._get, [name for name, _ in fresh])
        except (BotoCoreError, ClientError) as exc:
            raise KeyStoreError(f"{self.url}: {exc}") from None
        envelopes = [(n, e, b) for (n, e), b in zip(fresh, bodies, strict=True) if _S3_ENVELOPE.match(n)]
        keys = [(n, e, b) for (n, e), b in zip(fresh, bodies, strict=True) if not _S3_ENVELOPE.match(n)]
        for name, etag, body in envelopes + keys:
            self._seen[name] = etag
            if body is not None:
                self._apply(name, body)

    def _list(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._root):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self._root) :]
                if _S3_ENVELOPE.match(name) or _S3_KEY.match(name):
                    out.append((name, obj.get("ETag", "")))
        return out

    def _get(self, name: str) -> bytes | None:
        try:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self._root + name)["Body"].read())
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None  # deleted since it was listed
            raise

    def _apply(self, name: str, body: bytes) -> None:
        try:
            if m := _S3_ENVELOPE.match(name):
                self.view.add_envelope(stored_envelope(body, m[1], int(m[2])))
            elif m := _S3_KEY.match(name):
                self.view.add_key(stored_key(body, m[1], int(m[3]), m[2]), m[4])
        except UNDECODABLE as exc:
            self.skipped(f"s3://{self.bucket}/{self._root}{name}", exc)

    async def put_envelope(self, env: KeyringEnvelope) -> None:
        check_ids(env)
        name = f"{env.keyring_id}/envelope.v{env.dek_version}.msgpack"
        data = encode(env)
        try:
            reply = await self._call(self.client.put_object, Bucket=self.bucket, Key=self._root + name, Body=data,
                                     IfNoneMatch="*")  # fmt: skip
            self._seen[name] = reply.get("ETag", "")
        except ClientError as exc:
            if _code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise KeyStoreError(f"{self.url}: {exc}") from None
            if await self._call(self._get, name) != data:  # the same record again (a copy, a retry): no conflict
                raise KeyringConflict(f"keyring {env.keyring_id} version {env.dek_version} already exists") from None
        except BotoCoreError as exc:
            raise KeyStoreError(f"{self.url}: {exc}") from None
        self.view.add_envelope(env)

    async def put_keys(self, envelope: KeyringEnvelope, keys: list[SealedKey]) -> None:
        check_ids(envelope, keys)
        tag = dek_tag(envelope)
        todo = [k for k in keys if not self.view.has_key(k, tag)]

        def put(key: SealedKey) -> tuple[str, str]:
            name = f"{key.keyring_id}/keys/{key.key_id}.v{key.dek_version}.{tag}.msgpack"
            reply = self.client.put_object(Bucket=self.bucket, Key=self._root + name, Body=encode(key))
            return name, str(reply.get("ETag", ""))

        try:
            written = await self._all(put, todo)
        except (BotoCoreError, ClientError) as exc:
            raise KeyStoreError(f"{self.url}: {exc}") from None
        for (name, etag), key in zip(written, todo, strict=True):
            self._seen[name] = etag
            self.view.add_key(key, tag)


class DynamoDBKeyStore(_AwsKeyStore):
    service = "dynamodb"

    def __init__(self, table: str, *, region: str | None = None, endpoint: str | None = None, workers: int = 8,
                 scan_segments: int = 4) -> None:  # fmt: skip
        super().__init__(region, endpoint, workers)
        self.table = table
        self.url = f"dynamodb://{table}"
        self.scan_segments = max(1, min(scan_segments, workers))

    async def _check(self) -> None:
        try:
            await self._call(self.client.describe_table, TableName=self.table)
        except ClientError as exc:
            raise KeyStoreError(f"{self.url}: table {self.table} is not there or not readable ({_code(exc)}); "
                                "create it with partition key pk (type S)") from None  # fmt: skip

    async def refresh(self) -> None:
        """Scan the table (in parallel segments, strongly consistent) and add what is new to the view."""
        try:
            segments = await self._all(self._scan, range(self.scan_segments))
        except (BotoCoreError, ClientError) as exc:
            raise KeyStoreError(f"{self.url}: {exc}") from None
        items = [item for segment in segments for item in segment]
        items.sort(key=lambda item: not item[0].startswith("e/"))  # envelopes first
        for pk, body in items:
            if self._seen.get(pk) != body:
                self._seen[pk] = body
                self._apply(pk, body)

    def _scan(self, segment: int) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        pages = self.client.get_paginator("scan").paginate(
            TableName=self.table, ConsistentRead=True, Segment=segment, TotalSegments=self.scan_segments
        )
        for page in pages:
            for item in page.get("Items", []):
                pk, record = item.get("pk", {}).get("S"), item.get("record", {}).get("B")
                if type(pk) is str and (_DDB_ENVELOPE.match(pk) or _DDB_KEY.match(pk)):
                    out.append((pk, record if type(record) is bytes else b""))
        return out

    def _apply(self, pk: str, body: bytes) -> None:
        try:
            if m := _DDB_ENVELOPE.match(pk):
                self.view.add_envelope(stored_envelope(body, m[1], int(m[2])))
            elif m := _DDB_KEY.match(pk):
                self.view.add_key(stored_key(body, m[1], int(m[2]), m[4]), m[3])
        except UNDECODABLE as exc:
            self.skipped(f"{self.url} {pk}", exc)

    async def put_envelope(self, env: KeyringEnvelope) -> None:
        check_ids(env)
        pk = f"e/{env.keyring_id}/{env.dek_version}"
        data = encode(env)
        try:
            await self._call(self.client.put_item, TableName=self.table,
                             Item={"pk": {"S": pk}, "record": {"B": data}},
                             ConditionExpression="attribute_not_exists(pk)")  # fmt: skip
        except ClientError as exc:
            if _code(exc) != "ConditionalCheckFailedException":
                raise KeyStoreError(f"{self.url}: {exc}") from None
            reply = await self._call(self.client.get_item, TableName=self.table, Key={"pk": {"S": pk}},
                                     ConsistentRead=True)  # fmt: skip
            if reply.get("Item", {}).get("record", {}).get("B") != data:  # the same record again: no conflict
                raise KeyringConflict(f"keyring {env.keyring_id} version {env.dek_version} already exists") from None
        except BotoCoreError as exc:
            raise KeyStoreError(f"{self.url}: {exc}") from None
        self._seen[pk] = data
        self.view.add_envelope(env)

    async def put_keys(self, envelope: KeyringEnvelope, keys: list[SealedKey]) -> None:
        check_ids(envelope, keys)
        tag = dek_tag(envelope)
        todo = {f"k/{k.keyring_id}/{k.dek_version}/{tag}/{k.key_id}": k for k in keys if not self.view.has_key(k, tag)}
        names = list(todo)
        chunks = [names[i : i + 25] for i in range(0, len(names), 25)]  # BatchWriteItem takes 25 items

        def write(chunk: list[str]) -> None:
            requests = [{"PutRequest": {"Item": {"pk": {"S": pk}, "record": {"B": encode(todo[pk])}}}} for pk in chunk]
            pending: dict[str, Any] = {self.table: requests}
            for attempt in range(10):
                reply = self.client.batch_write_item(RequestItems=pending)
                pending = reply.get("UnprocessedItems") or {}
                if not pending:
                    return
                time.sleep(min(1.0, 0.05 * 2**attempt))  # throttled: back off within this worker thread
            raise KeyStoreError(f"{self.url}: items left unprocessed after 10 attempts")

        try:
            await self._all(write, chunks)
        except (BotoCoreError, ClientError) as exc:
            raise KeyStoreError(f"{self.url}: {exc}") from None
        for pk, key in todo.items():
            self._seen[pk] = encode(key)
            self.view.add_key(key, tag)
