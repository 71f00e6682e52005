"""The `signer` command: demo, up, host, keys create|list."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from cryptography import x509

from schemas.logs import configure_logging

from .config import HostConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m signer", description="Enclave signer cluster")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="start a local cluster, sign a sample batch, verify, stop")
    demo.add_argument("-n", type=int, default=200, help="number of sample requests")
    sub.add_parser("up", help="run a local cluster in the foreground until interrupted")
    sub.add_parser("host", help="run one host worker (KAFKA_BOOTSTRAP, SIGNER_ENCLAVES)")
    dk = sub.add_parser("dev-kms-key", help="create the keyring KMS key in the dev KMS, bound to this enclave code")
    dk.add_argument("--kms-endpoint", default=os.environ.get("SIGNER_KMS_ENDPOINT", "http://127.0.0.1:8000"))
    dk.add_argument("--out", default=None, help="also write the key id to this file")
    keys = sub.add_parser("keys", help="key management through a running cluster")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="create a key inside an enclave")
    kc.add_argument("--scheme", choices=["secp256k1", "ed25519"], default="secp256k1")
    kc.add_argument("--keyring", default=None, help="keyring to add it to (default: SIGNER_DEFAULT_KEYRING)")
    kc.add_argument("--policy", default=None, help="JSON file: the key's signing policy, sealed with it")
    ksub.add_parser("list", help="list the keys in the key store")
    ki = ksub.add_parser("import", help="import a private key, encrypted to an attested enclave")
    ki.add_argument("--scheme", choices=["secp256k1", "ed25519"], default="secp256k1")
    ki.add_argument("--keyring", default=None)
    ki.add_argument("--policy", default=None, help="JSON file: the key's signing policy, sealed with it")
    ki.add_argument("--key-file", required=True, help="file holding the 32-byte private key as hex ('-' = stdin)")
    ki.add_argument(
        "--attestation-root",
        default=os.environ.get("SIGNER_ATTESTATION_ROOT", ""),
        help="DER root certificate to verify the enclave against (dev: DATA_DIR/devkms/pki/root.der)",
    )
    ki.add_argument("--expect-pcr0", default=None, help="refuse unless the enclave runs this image (hex)")
    kr = ksub.add_parser("rotate-dek", help="new data key version for a keyring; its keys are sealed again")
    kr.add_argument("--keyring", default=None)
    args = ap.parse_args(argv)

    configure_logging("signer", os.environ.get("SIGNER_LOG_LEVEL", "WARNING" if args.cmd != "host" else "INFO"))
    try:
        if args.cmd == "demo":
            from .demo import run_demo

            return _run(run_demo(args.n))
        if args.cmd == "up":
            return _run(_up())
        if args.cmd == "host":
            return _run(_host())
        if args.cmd == "dev-kms-key":
            return _run(_dev_kms_key(args))
        return _run(_keys(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for the operator, not a traceback
        from aiokafka.errors import KafkaError

        from broker.local_kafka import KafkaUnavailable

        from .admin_client import AdminError
        from .config import ConfigError

        if isinstance(exc, KafkaError):
            print(f"signer: Kafka error: {exc!r} (is KAFKA_BOOTSTRAP right and the broker up?)", file=sys.stderr)
            return 2
        if isinstance(exc, KafkaUnavailable | AdminError | ConfigError | ValueError):
            print(f"signer: {exc}", file=sys.stderr)
            return 2
        raise


def _run(coro: object) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro) or 0)  # type: ignore[arg-type]
    except ImportError:
        return int(asyncio.run(coro) or 0)  # type: ignore[arg-type]


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _up() -> int:
    from .cluster import LocalCluster

    data_dir = Path(os.environ.get("SIGNER_DATA_DIR") or Path.home() / ".local/share/enclave-signer")
    async with LocalCluster(data_dir=data_dir) as cluster:
        print(f"KAFKA_BOOTSTRAP={cluster.bootstrap}", flush=True)
        print(f"data (dev KMS keys, wrapped keyrings): {data_dir}", flush=True)
        print(f"metrics: http://127.0.0.1:{cluster.http_port}/metrics  (Ctrl-C to stop)", flush=True)
        waiter = asyncio.create_task(_until_signal())
        runner = asyncio.create_task(cluster.wait())
        done, _ = await asyncio.wait({waiter, runner}, return_when=asyncio.FIRST_COMPLETED)
        for t in (waiter, runner):
            if t not in done:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        for t in done:
            t.result()
    print("stopped", flush=True)
    return 0


async def _dev_kms_key(args: argparse.Namespace) -> int:
    """A KMS key whose policy releases data keys only to this enclave code's measurement (dev KMS)."""
    from devkms.local import create_keyring_key

    key_id = await create_keyring_key(args.kms_endpoint, description="signer keyrings (dev)")
    if args.out:
        await asyncio.to_thread(Path(args.out).write_text, key_id + "\n")
    print(key_id)
    return 0


async def _host() -> int:
    from .config import ConfigError, HostConfig
    from .host import HostWorker
    from .http import serve_http

    cfg = HostConfig.from_env()
    if not cfg.bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP is not set (HOST:PORT of the Kafka cluster)")
    host = HostWorker(cfg)
    await host.start()
    runner, port = await serve_http(host, cfg.http_host, cfg.http_port)
    print(f"host worker up; metrics on http://{cfg.http_host}:{port}/metrics", flush=True)
    run = asyncio.create_task(host.run())
    stop = asyncio.create_task(_until_signal())
    await asyncio.wait({run, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stop
    await host.stop_within(run, cfg.shutdown_timeout_s)
    run.result()  # re-raise a failure of the loop
    await runner.cleanup()
    return 0


async def _keys(args: argparse.Namespace) -> int:
    from .admin_client import admin_call
    from .config import ConfigError

    cfg = HostConfig.from_env()
    if not cfg.bootstrap:
        raise ConfigError(
            "KAFKA_BOOTSTRAP is not set: start a cluster with `python -m signer up` and export "
            "the KAFKA_BOOTSTRAP=HOST:PORT line it prints"
        )
    ring: dict[str, object] = {"keyring": args.keyring} if getattr(args, "keyring", None) else {}
    if getattr(args, "policy", None):
        ring["policy"] = _read_policy(args.policy)
    if args.keys_cmd == "create":
        result = await admin_call(cfg.bootstrap, "keys.create", {"scheme": args.scheme, **ring}, cfg.layout)
    elif args.keys_cmd == "import":
        result = await _import(cfg, args, ring)
    elif args.keys_cmd == "rotate-dek":
        result = await admin_call(cfg.bootstrap, "keys.rotate_dek", ring, cfg.layout)
    else:
        result = await admin_call(cfg.bootstrap, "keys.list", {}, cfg.layout)
    print(json.dumps(result))
    return 0


def _read_policy(path: str) -> dict[str, object]:
    from .config import ConfigError

    try:
        policy = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--policy {path}: {exc}") from None
    if not isinstance(policy, dict):
        raise ConfigError(f"--policy {path}: the policy must be a JSON object")
    return policy


def _import_inputs(args: argparse.Namespace) -> tuple[bytes, x509.Certificate]:
    """The private key and the root to trust, read before anything is sent."""
    from .config import ConfigError

    if not args.attestation_root or not Path(args.attestation_root).is_file():
        raise ConfigError("--attestation-root (SIGNER_ATTESTATION_ROOT) must name the DER root certificate to trust")
    text = sys.stdin.read() if args.key_file == "-" else Path(args.key_file).read_text()
    try:
        secret = bytes.fromhex(text.strip().removeprefix("0x"))
    except ValueError:
        raise ConfigError(f"{args.key_file}: not a hex private key") from None
    if len(secret) != 32:
        raise ConfigError(f"{args.key_file}: a private key is 32 bytes, this is {len(secret)}")
    return secret, x509.load_der_x509_certificate(Path(args.attestation_root).read_bytes())


async def _import(cfg: HostConfig, args: argparse.Namespace, ring: dict[str, object]) -> dict[str, object]:
    from schemas.attestation import AttestationError

    from .admin_client import admin_call
    from .config import ConfigError
    from .key_import import encrypt_for_enclave

    secret, root = _import_inputs(args)
    target = await admin_call(cfg.bootstrap, "keys.import_target", ring, cfg.layout)
    try:
        encrypted = encrypt_for_enclave(target["attestation_document"], secret, root, args.expect_pcr0)
    except AttestationError as exc:
        raise ConfigError(f"refusing to send the key: the enclave's attestation does not verify: {exc}") from None
    op = {"scheme": args.scheme, "enclave_id": target["enclave_id"], "encrypted_key": encrypted, **ring}
    return await admin_call(cfg.bootstrap, "keys.import", op, cfg.layout)
