"""A malicious host: real enclave worker and dev KMS processes, and a test that speaks the frame
protocol to the enclave directly, with the host's powers and nothing more.

The attacker holds what a compromised parent instance holds: the channel to the enclave, the
key store's records, KMS credentials of its own (here the dev KMS's, which may create keys and
call Decrypt), and the traffic it relays. It does not hold the dev attestation PKI's signing key
(on Nitro that is AWS's) nor an operator key.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from devkms.local import DevEnclave, dev_kms_client
from enclave_worker.kms import KmsClient
from schemas import frames
from signer.backend import EnclaveBackend
from signer.operator import AdminSession
from signer.pool import EnclavePool, PoolSettings
from signer.topology import ChildProcess, Enclaves, Topology


class HostileChannel:
    """One raw connection to an enclave worker."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict[str, Any]) -> None:
        self.reader, self.writer, self.hello = reader, writer, hello
        self._ids = itertools.count(1)

    @classmethod
    async def open(cls, url: str) -> HostileChannel:
        reader, writer = await asyncio.open_unix_connection(url.removeprefix("unix://"))
        hello = await frames.read_frame(reader)
        assert hello["t"] == frames.HELLO
        return cls(reader, writer, hello)

    async def send(self, *bodies: dict[str, Any]) -> None:
        """Several frames in one write (as an attacker interleaves them)."""
        self.writer.write(b"".join(frames.encode_frame(b) for b in bodies))
        await self.writer.drain()

    async def read(self, timeout: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return await frames.read_frame(self.reader)

    async def key_op(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        op_id = next(self._ids) + 1000
        await self.send({"t": frames.KEY_OP, "id": op_id, "op": op, "args": args})
        while True:
            body = await self.read()
            if body["t"] == frames.KEY_OP_RESULT and body["id"] == op_id:
                return body

    async def results(self, n: int) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        while len(out) < n:
            body = await self.read()
            if body["t"] == frames.RESULTS:
                out.update({corr: res for corr, res in body["items"]})
        return out

    async def closed(self, timeout: float = 10) -> bool:
        """True once the enclave has closed this connection (frames before EOF are skipped)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await frames.read_frame(self.reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return True
        except frames.FrameError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@dataclass
class Stage:
    """Dev KMS + enclave worker processes + the honest host's parts (for the operator's legitimate
    work), built by signer/topology.py."""

    tmp: Path
    sock_dir: Path
    topology: Topology = field(init=False)
    urls: list[str] = field(default_factory=list)
    dev: DevEnclave | None = None
    backend: EnclaveBackend | None = None
    pool: EnclavePool | None = None  # the backend's
    operator: AdminSession | None = None

    def __post_init__(self) -> None:
        self.topology = Topology(self.tmp, sock_dir=self.sock_dir, log_dir=self.tmp)

    @property
    def kms_url(self) -> str:
        return self.topology.kms_url

    @property
    def enclaves(self) -> list[ChildProcess]:
        return [e.process for e in self.topology.enclaves.values()]

    async def start(self, enclaves: int = 1, env: dict[str, str] | None = None) -> Stage:
        await self.topology.start_kms()
        self.dev = await self.topology.provision()
        self.urls = [e.url for e in await self.topology.start_enclaves(Enclaves(enclaves, "enc", env=env or {}))]
        self.backend = await self.topology.start_backend(PoolSettings(connections_per_enclave=1))
        self.pool = self.backend.pool
        self.operator = self.dev.admin(self.backend.handle)
        return self

    async def start_enclave(self, name: str, env: dict[str, str] | None = None) -> str:
        """Another enclave worker (the dev configuration unless env says otherwise); its URL."""
        return (await self.topology.start_enclave(name, env=env)).url

    def attacker_kms(self) -> KmsClient:
        """KMS as the host can use it: its own credentials, any key it creates."""
        return cast(KmsClient, dev_kms_client(self.kms_url))

    async def channel(self, i: int = 0) -> HostileChannel:
        return await HostileChannel.open(self.urls[i])

    async def stop(self) -> None:
        await self.topology.aclose()


def enclave_rss_kib(proc: ChildProcess) -> int:
    """Resident memory of an enclave worker process (VmRSS), in KiB."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
