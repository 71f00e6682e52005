"""python -m enclave_worker --listen URL --config FILE [options]: serve signing frames (see --help).

The configuration file holds the enclave's trust anchors (KMS endpoint and key ARNs,
operator keys, attestation mode: see trust.py). `python -m enclave_worker --measure
--config FILE` prints the dev measurement (PCR0) of this code with that configuration,
which goes into the keyring KMS key's policy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from schemas.frames import MAX_ENCLAVE_ID_CHARS
from schemas.logs import configure_logging
from schemas.transport import TransportUrlError, parse_channel_url

from .auth import Authenticator
from .server import EnclaveServer
from .trust import DEFAULT_CONFIG_PATH, ConfigError, EnclaveConfig, load_config
from .vault import Vault, VaultSettings


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m enclave_worker", description="Serve signing frames.")
    ap.add_argument("--listen", default=_env("ENCLAVE_LISTEN", "vsock://4294967295:5000"),
                    help="vsock://CID:PORT, unix:///path or tcp://host:port")  # fmt: skip
    ap.add_argument("--enclave-id", default=_env("ENCLAVE_ID", socket.gethostname()))
    ap.add_argument("--credits", default=_env("ENCLAVE_CREDITS", "4096"),
                    help="requests the host may have in flight per connection (1-100,000)")  # fmt: skip
    ap.add_argument("--handler", choices=["sign", "noop"], default=_env("ENCLAVE_HANDLER", "sign"),
                    help="noop: answer without signing (channel benchmarks and tests only)")  # fmt: skip
    ap.add_argument("--config", default=_env("ENCLAVE_CONFIG", DEFAULT_CONFIG_PATH),
                    help="the measured enclave configuration (trust anchors); on Nitro, in the image")  # fmt: skip
    ap.add_argument("--dev-pki", default=_env("ENCLAVE_DEV_PKI", ""), help="dev PKI directory (dev attestation)")
    ap.add_argument("--measure", action="store_true", help="print the dev PCR0 of this code and --config, and exit")
    args = ap.parse_args(argv)
    config: EnclaveConfig | None = None
    if args.handler == "sign" or args.measure:
        try:
            config, config_bytes = load_config(args.config)
        except ConfigError as exc:
            return _fail(str(exc))
    if args.measure:
        from .attestation import measure_enclave_code

        print(measure_enclave_code(config_bytes).hex())
        return 0
    try:
        parse_channel_url(args.listen)
    except TransportUrlError as exc:
        return _fail(str(exc))
    try:
        credits = int(args.credits)
    except ValueError:
        credits = 0
    if not 1 <= credits <= 100_000:
        return _fail(f"--credits / ENCLAVE_CREDITS={args.credits!r}: must be an integer between 1 and 100,000")
    if not 1 <= len(args.enclave_id) <= MAX_ENCLAVE_ID_CHARS:
        return _fail(f"--enclave-id / ENCLAVE_ID must be 1-{MAX_ENCLAVE_ID_CHARS} characters (hosts refuse longer)")
    # these come from the host's environment: each bounded, so that no value turns a check off (a NaN
    # window would make every request fresh) or lets the enclave hold or wait without bound
    try:
        limits = _limits()
    except ValueError as exc:
        return _fail(str(exc))
    configure_logging("enclave_worker")
    vault = None
    if config is not None:
        if config.attestation == "dev" and not (Path(args.dev_pki) / "root.der").exists():
            return _fail(f"--dev-pki {args.dev_pki!r} holds no dev PKI (start the dev KMS first: python -m devkms)")
        vault = _vault(args, config, config_bytes, limits)
    auth = Authenticator(window_s=limits["ENCLAVE_AUTH_WINDOW_S"], replay_capacity=int(limits["ENCLAVE_REPLAY_CACHE"]))
    server = EnclaveServer(args.listen, args.enclave_id, credits, args.handler, vault, auth)
    asyncio.run(_run(server))
    return 0


# setting: (default, smallest, largest, integer?)
LIMITS: dict[str, tuple[float, float, float, bool]] = {
    "ENCLAVE_AUTH_WINDOW_S": (300, 1, 3600, False),
    "ENCLAVE_REPLAY_CACHE": (100_000, 1, 10_000_000, True),
    "ENCLAVE_MAX_CONCURRENT_UNWRAPS": (4, 1, 64, True),
    "ENCLAVE_UNWRAP_TIMEOUT_S": (30, 0.1, 300, False),
    "ENCLAVE_DEK_CACHE_ENTRIES": (1024, 1, 100_000, True),
    "ENCLAVE_DEK_TTL_S": (3600, 1, 86_400, False),
    "ENCLAVE_DEK_MAX_USES": (10_000_000, 1, 10**12, True),
    "ENCLAVE_MAX_KEYS": (100_000, 1, 10_000_000, True),
    "ENCLAVE_MAX_KEY_BYTES": (64 * 1024 * 1024, 1024 * 1024, 4 * 1024**3, True),
    "ENCLAVE_MAX_OPEN_KEYS": (20_000, 1, 1_000_000, True),
}


def _limits() -> dict[str, float]:
    """Every LIMITS setting from the environment, checked: ValueError naming the first bad one."""
    out: dict[str, float] = {}
    for name, (default, lo, hi, integer) in LIMITS.items():
        raw = os.environ.get(name)
        if raw is None:
            out[name] = default
            continue
        try:
            value: float = int(raw) if integer else float(raw)
        except ValueError:
            value = float("nan")
        if not lo <= value <= hi:  # False for NaN too
            kind = "an integer" if integer else "a number"
            raise ValueError(f"{name}={raw!r}: must be {kind} between {lo:,} and {hi:,}")
        out[name] = value
    return out


def _fail(message: str) -> int:
    print(f"enclave_worker: {message}", file=sys.stderr)
    return 2


def _vault(args: argparse.Namespace, config: EnclaveConfig, config_bytes: bytes, limits: dict[str, float]) -> Vault:
    from .attestation import AttestationProvider, DevProvider, NsmProvider
    from .kms import KmsClient, KmsConfig

    kms = KmsClient(
        KmsConfig(
            config.kms_endpoint,
            region=config.kms_region,
            access_key_id=_env("SIGNER_KMS_ACCESS_KEY_ID", ""),
            secret_access_key=_env("SIGNER_KMS_SECRET_ACCESS_KEY", ""),
            session_token=os.environ.get("SIGNER_KMS_SESSION_TOKEN"),
        )
    )
    provider: AttestationProvider = (
        DevProvider(Path(args.dev_pki), config_bytes) if config.attestation == "dev" else NsmProvider()
    )
    settings = VaultSettings(
        max_concurrent_unwraps=int(limits["ENCLAVE_MAX_CONCURRENT_UNWRAPS"]),
        unwrap_timeout_s=limits["ENCLAVE_UNWRAP_TIMEOUT_S"],
        cache_entries=int(limits["ENCLAVE_DEK_CACHE_ENTRIES"]),
        cache_ttl_s=limits["ENCLAVE_DEK_TTL_S"],
        cache_max_uses=int(limits["ENCLAVE_DEK_MAX_USES"]),
        max_keys=int(limits["ENCLAVE_MAX_KEYS"]),
        max_key_bytes=int(limits["ENCLAVE_MAX_KEY_BYTES"]),
        max_open_keys=int(limits["ENCLAVE_MAX_OPEN_KEYS"]),
    )
    return Vault(kms, provider, config, settings)


async def _run(server: EnclaveServer) -> None:
    await server.start()
    # readiness signal for the process that started us: one line on stdout
    print(f"READY {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serve = asyncio.create_task(server.serve_forever())
    await stop.wait()
    serve.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serve
    await server.close()


if __name__ == "__main__":
    sys.exit(main())
