"""The `signer` command: demo, up, host, gateway, keys create|list|import|rotate-dek|migrate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from schemas.logs import configure_logging

from .config import HostConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m signer", description="Enclave signer cluster")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="start a local cluster, sign a sample batch, verify, stop")
    demo.add_argument("-n", type=int, default=200, help="number of sample requests")
    up = sub.add_parser("up", help="run a local cluster in the foreground until interrupted")
    up.add_argument("--brokers", type=int, default=1,
                    help="Kafka nodes to start, each a broker and controller (default 1); topics get min(3, N) "
                         "replicas, min.insync.replicas=2 with three")  # fmt: skip
    sub.add_parser("host", help="run one host worker (KAFKA_BOOTSTRAP, SIGNER_ENCLAVES)")
    sub.add_parser("gateway", help="run the HTTP gateway: native API and Web3Signer-compatible eth1 JSON-RPC "
                   "(KAFKA_BOOTSTRAP, SIGNER_GATEWAY_*)")  # fmt: skip
    dk = sub.add_parser("dev-enclave", help="dev KMS: write a dev enclave configuration, operator key and a keyring "
                        "KMS key bound to the measurement of this code and that configuration")  # fmt: skip
    dk.add_argument("--kms-endpoint", default=os.environ.get("SIGNER_KMS_ENDPOINT", "http://127.0.0.1:8000"))
    dk.add_argument("--kms-data-dir", required=True, help="the dev KMS's data directory (its PKI is used)")
    dk.add_argument("--out", required=True, help="directory for enclave-config.json and operator.pem")
    keys = sub.add_parser("keys", help="key management through a running cluster, as an operator")
    operator = argparse.ArgumentParser(add_help=False)
    operator.add_argument("--operator-key", action="append", default=None,
                      help="operator ed25519 key (PEM); repeat for a quorum (default: SIGNER_OPERATOR_KEY, "
                           "comma-separated)")  # fmt: skip
    operator.add_argument("--attestation-root", default=os.environ.get("SIGNER_ATTESTATION_ROOT", ""),
                      help="DER root certificate enclaves are verified against (Nitro: the AWS Nitro root; "
                           "dev: DATA_DIR/devkms/pki/root.der)")  # fmt: skip
    operator.add_argument("--expect-pcr0", default=os.environ.get("SIGNER_EXPECT_PCR0", ""),
                      help="the enclave image measurement (hex) to insist on (SIGNER_EXPECT_PCR0)")  # fmt: skip
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser(parents=[operator], name="create", help="create a key inside an enclave")
    kc.add_argument("--scheme", choices=["secp256k1", "ed25519"], default="secp256k1")
    kc.add_argument("--keyring", default=None, help="keyring to add it to (default: SIGNER_DEFAULT_KEYRING)")
    kc.add_argument("--policy", default=None, help="JSON file: the key's signing policy, sealed with it")
    ksub.add_parser(
        parents=[operator], name="list", help="list the keys an attested enclave can open, with their policy hashes"
    )
    ki = ksub.add_parser(
        parents=[operator], name="import", help="import a private key, encrypted to an attested enclave"
    )
    ki.add_argument("--scheme", choices=["secp256k1", "ed25519"], default="secp256k1")
    ki.add_argument("--keyring", default=None)
    ki.add_argument("--policy", default=None, help="JSON file: the key's signing policy, sealed with it")
    ki.add_argument("--key-file", required=True, help="file holding the 32-byte private key as hex ('-' = stdin)")
    kr = ksub.add_parser(
        parents=[operator], name="rotate-dek", help="new data key version for a keyring; its keys are sealed again"
    )
    kr.add_argument("--keyring", default=None)
    km = ksub.add_parser("migrate", help="copy one key store's keyrings and sealed keys into another, then verify "
                         "every record (no enclave, no operator key: the records are wrapped)")  # fmt: skip
    km.add_argument("--from", dest="source", required=True, help="key store URL to copy from (SIGNER_KEYSTORE form)")
    km.add_argument("--to", dest="target", required=True, help="key store URL to copy into")
    args = ap.parse_args(argv)
    if args.cmd == "up" and args.brokers < 1:
        ap.error("--brokers must be at least 1")

    configure_logging(
        "signer", os.environ.get("SIGNER_LOG_LEVEL", "WARNING" if args.cmd not in ("host", "gateway") else "INFO")
    )
    try:
        if args.cmd == "demo":
            from .demo import run_demo

            return _run(run_demo(args.n))
        if args.cmd == "up":
            return _run(_up(args.brokers))
        if args.cmd == "host":
            return _run(_host())
        if args.cmd == "gateway":
            from .gateway import run_gateway

            return _run(run_gateway())
        if args.cmd == "dev-enclave":
            return _run(_dev_enclave(args))
        if args.keys_cmd == "migrate":
            return _run(_migrate(args.source, args.target))
        return _run(_keys(args, *_operator_inputs(args)))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for the operator, not a traceback
        from aiokafka.errors import KafkaConnectionError, KafkaError, ProducerFenced

        from broker.local_kafka import KafkaUnavailable

        from .admin_client import AdminError
        from .cluster import ClusterError
        from .config import ConfigError
        from .keystore import KeyStoreError

        if isinstance(exc, ProducerFenced):
            print("signer: fenced: another host uses the same transactional id (SIGNER_TRANSACTIONAL_ID); "
                  "this one stops", file=sys.stderr)  # fmt: skip
            return 2
        if isinstance(exc, KafkaConnectionError):
            print(f"signer: Kafka error: {exc!r} (is KAFKA_BOOTSTRAP right and the broker up?)", file=sys.stderr)
            return 2
        if isinstance(exc, KafkaError):
            print(f"signer: Kafka error: {exc!r}", file=sys.stderr)
            return 2
        if isinstance(exc, KafkaUnavailable | AdminError | ConfigError | ClusterError | ValueError | KeyStoreError):
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


async def _up(brokers: int = 1) -> int:
    from .cluster import LocalCluster

    data_dir = Path(os.environ.get("SIGNER_DATA_DIR") or Path.home() / ".local/share/enclave-signer")
    async with LocalCluster(data_dir=data_dir, brokers=brokers) as cluster:
        print(f"KAFKA_BOOTSTRAP={cluster.bootstrap}", flush=True)
        print(f"GATEWAY_URL={cluster.gateway_url}", flush=True)
        print(f"GATEWAY_TOKEN={cluster.gateway_token}", flush=True)
        print(f"data (dev KMS keys, wrapped keyrings): {data_dir}", flush=True)
        print(f"metrics: http://127.0.0.1:{cluster.http_port}/metrics  (Ctrl-C to stop)", flush=True)
        assert cluster.dev is not None
        print("key management as the dev operator (signer keys ...):", flush=True)
        for name, value in cluster.dev.cli_env().items():
            print(f"export {name}={value}", flush=True)
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


async def _dev_enclave(args: argparse.Namespace) -> int:
    """A dev enclave configuration whose keyring KMS key releases data keys only to its measurement."""
    from devkms.local import provision_dev_enclave

    out = Path(args.out)
    existing = out / "kms_key_arn"
    arn = existing.read_text().strip() if existing.exists() else None
    dev = await provision_dev_enclave(args.kms_endpoint, Path(args.kms_data_dir), out, arn)
    await asyncio.to_thread(existing.write_text, dev.kms_key_arn + "\n")
    print(
        json.dumps({"config": str(dev.config_path), "kms_key_arn": dev.kms_key_arn, "pcr0": dev.pcr0, **dev.cli_env()})
    )
    return 0


async def _host() -> int:
    from .config import ConfigError, HostConfig
    from .host import HostWorker
    from .http import listen_socket, serve_http

    cfg = HostConfig.from_env()
    if not cfg.bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP is not set (HOST:PORT of the Kafka cluster)")
    sock = listen_socket(cfg.http_host, cfg.http_port)  # a port in use: one line, before anything starts
    host = HostWorker(cfg)
    try:
        await host.start()
        runner, port = await serve_http(host, cfg.http_host, cfg.http_port, sock=sock)
    except BaseException:
        sock.close()
        raise
    # the readiness contract every process of the cluster keeps: HTTP endpoints and Kafka consumer are up
    print(f"READY http://{cfg.http_host}:{port}", flush=True)
    print(f"host worker up; metrics on http://{cfg.http_host}:{port}/metrics", flush=True)
    run = asyncio.create_task(host.run())
    stop = asyncio.create_task(_until_signal())
    await asyncio.wait({run, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stop
    try:
        await host.stop_within(run, cfg.shutdown_timeout_s)  # re-raises a failure of the loop
        if not run.cancelled():  # cancelled: past the shutdown timeout (logged); the next owner redoes the rest
            run.result()
    except BaseExceptionGroup as group:  # a task of the loop failed: the first failure, as one line
        raise _first_failure(group) from None
    finally:
        await runner.cleanup()
    return 0


def _first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _operator_inputs(args: argparse.Namespace) -> tuple[list[Any], x509.Certificate, bytes | None]:
    """Operator keys, the attestation root and (for import) the private key: read before anything is sent."""
    from .config import ConfigError
    from .operator import OperatorKey

    if not os.environ.get("KAFKA_BOOTSTRAP"):
        raise ConfigError(
            "KAFKA_BOOTSTRAP is not set: start a cluster with `python -m signer up` and export "
            "the KAFKA_BOOTSTRAP=HOST:PORT line it prints"
        )
    key_paths = args.operator_key or [p for p in os.environ.get("SIGNER_OPERATOR_KEY", "").split(",") if p]
    if not key_paths:
        raise ConfigError("no operator key: pass --operator-key FILE or set SIGNER_OPERATOR_KEY")
    if not args.expect_pcr0:
        raise ConfigError("the expected enclave image is required: pass --expect-pcr0 HEX or set SIGNER_EXPECT_PCR0")
    if not args.attestation_root or not Path(args.attestation_root).is_file():
        raise ConfigError("--attestation-root (SIGNER_ATTESTATION_ROOT) must name the DER root certificate to trust")
    root = x509.load_der_x509_certificate(Path(args.attestation_root).read_bytes())
    secret = _read_secret(args.key_file) if args.keys_cmd == "import" else None
    return [OperatorKey.load(p) for p in key_paths], root, secret


async def _keys(args: argparse.Namespace, operators: list[Any], root: x509.Certificate, secret: bytes | None) -> int:
    from .admin_client import admin_call
    from .config import ConfigError
    from .operator import AdminSession

    cfg = HostConfig.from_env()
    if not cfg.bootstrap:
        raise ConfigError(
            "KAFKA_BOOTSTRAP is not set: start a cluster with `python -m signer up` and export "
            "the KAFKA_BOOTSTRAP=HOST:PORT line it prints"
        )

    async def call(op: str, op_args: dict[str, object]) -> dict[str, object]:
        return await admin_call(cfg.bootstrap, op, op_args, cfg.layout)

    session = AdminSession(call, operators, root, args.expect_pcr0)
    keyring = getattr(args, "keyring", None) or cfg.default_keyring
    policy = _read_policy(args.policy) if getattr(args, "policy", None) else None
    result: object
    if args.keys_cmd == "create":
        result = await session.create_key(args.scheme, keyring, policy)
    elif args.keys_cmd == "import":
        assert secret is not None
        result = await session.import_key(args.scheme, keyring, secret, policy)
    elif args.keys_cmd == "rotate-dek":
        result = await session.rotate_dek(keyring)
    else:
        result = {"keys": await session.list_keys()}
    print(json.dumps(result))
    return 0


async def _migrate(source: str, target: str) -> int:
    """`keys migrate`: both URLs are checked before anything is read; kafka:// is KAFKA_BOOTSTRAP's."""
    from .config import ConfigError, HostConfig
    from .keystore import parse_url
    from .keystore_migrate import migrate

    for flag, url in (("--from", source), ("--to", target)):
        try:
            where = parse_url(url)
        except ValueError as exc:
            raise ConfigError(f"{flag} {url}: {exc}") from None
        if where.scheme == "kafka" and not os.environ.get("KAFKA_BOOTSTRAP"):
            raise ConfigError(f"{flag} {url}: KAFKA_BOOTSTRAP is not set (HOST:PORT of the cluster's Kafka)")
    result = await migrate(source, target, bootstrap=HostConfig.from_env().bootstrap)
    print(json.dumps(result.summary()))
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


def _read_secret(key_file: str) -> bytes:
    """The private key to import, read before anything is sent."""
    from .config import ConfigError

    text = sys.stdin.read() if key_file == "-" else Path(key_file).read_text()
    try:
        secret = bytes.fromhex(text.strip().removeprefix("0x"))
    except ValueError:
        raise ConfigError(f"{key_file}: not a hex private key") from None
    if len(secret) != 32:
        raise ConfigError(f"{key_file}: a private key is 32 bytes, this is {len(secret)}")
    return secret
