"""Enclave worker and dev KMS processes for synchronous tests (the wrapper and command lines of
signer/topology.py), and a scripted enclave peer for channel tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from devkms.local import DEV_ACCESS_KEY_ID, DEV_SECRET_ACCESS_KEY, DevEnclave, provision_dev_enclave
from schemas import frames
from signer.topology import ChildProcess, enclave_process, kms_process, unix_url


def start_enclave(
    sock_dir: Path, name: str, log_dir: Path, *, handler: str = "sign", credits: int = 4096,
    env: dict[str, str] | None = None,
) -> tuple[ChildProcess, str]:  # fmt: skip
    """An enclave worker listening at SOCK_DIR/NAME.sock, once READY; (process, URL)."""
    url = unix_url(sock_dir, name)
    proc = enclave_process(url, name, env, log=log_dir / f"{name}.log", handler=handler, credits=credits).spawn()
    proc.wait_ready()
    return proc, url


class ScriptedEnclave:
    """A real Unix-socket server speaking the frame protocol as a test scripts it.

    It stands behind the channel seam (the transport URL), so the host code under
    test is the production code; only the enclave's behaviour is scripted.
    """

    def __init__(
        self,
        path: Path,
        credits: int,
        on_frame: Callable[[ScriptedEnclave, dict[str, Any], asyncio.StreamWriter], Awaitable[None]] | None = None,
    ):
        self.path = path
        self.url = f"unix://{path}"
        self.credits = credits
        self.received: list[list[Any]] = []  # sign items, in arrival order
        self.frames_seen: list[str] = []
        self.changed = asyncio.Condition()
        self.writers: list[asyncio.StreamWriter] = []
        self._on_frame = on_frame
        self._server: asyncio.Server | None = None
        self.hello: dict[str, Any] = {"t": frames.HELLO, "proto": frames.PROTOCOL_VERSION, "enclave_id": "scripted"}

    async def __aenter__(self) -> ScriptedEnclave:
        self._server = await asyncio.start_unix_server(self._conn, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self.writers:
            w.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    async def send(self, body: dict[str, Any], writer: asyncio.StreamWriter | None = None) -> None:
        w = writer or self.writers[-1]
        await frames.write_frame(w, frames.encode_frame(body))

    async def answer(self, items: list[Any], writer: asyncio.StreamWriter) -> None:
        """Answer sign items as the real enclave's noop handler does (sha256 of each request)."""
        from enclave_worker.noop import noop_batch

        await self.send({"t": frames.RESULTS, "credits": len(items), "items": noop_batch(items)}, writer)

    async def wait_received(self, n: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: len(self.received) >= n)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await self.send({**self.hello, "credits": self.credits}, writer)
        try:
            while True:
                body = await frames.read_frame(reader)
                async with self.changed:
                    self.frames_seen.append(body["t"])
                    if body["t"] == frames.SIGN:
                        self.received.extend(body["items"])
                    elif body["t"] == frames.PING:
                        await self.send({"t": frames.PONG, "id": body.get("id")}, writer)
                    elif body["t"] == frames.KEY_OP:
                        await self.send(
                            {"t": frames.KEY_OP_RESULT, "id": body["id"], "ok": True, "result": {"keys": []}}, writer
                        )
                    self.changed.notify_all()
                if self._on_frame is not None:
                    await self._on_frame(self, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll host-side state (no event exists for it) until it holds; fail after timeout."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - polling in-process state, bounded by the timeout
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


DEV_CREDS = {"SIGNER_KMS_ACCESS_KEY_ID": DEV_ACCESS_KEY_ID, "SIGNER_KMS_SECRET_ACCESS_KEY": DEV_SECRET_ACCESS_KEY}


async def dev_enclave(kms_url: str, tmp: Path, kms_key_arn: str | None = None) -> DevEnclave:
    """The dev enclave configuration, operator key and keyring KMS key for a test's dev KMS
    (started with start_devkms(tmp / "devkms", ...))."""
    return await provision_dev_enclave(kms_url, tmp / "devkms", tmp / "enclave", kms_key_arn)


def start_devkms(data_dir: Path, log_dir: Path, env: dict[str, str] | None = None) -> tuple[ChildProcess, str]:
    """The dev KMS on data_dir, once READY; (process, URL)."""
    proc = kms_process(data_dir, env, log=log_dir / "devkms.log").spawn()
    return proc, proc.wait_ready()
