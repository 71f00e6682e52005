"""The gateway's Web3Signer-compatible eth1 surface (see docs/gateway.md for what is matched and where
Web3Signer's behaviour was read).

- JSON-RPC 2.0 on `POST /`: `eth_accounts`, `eth_sign`, `eth_signTransaction`, `eth_signTypedData`
  (and `eth_signTypedData_v4`), plus `personal_sign` (what ethers' JsonRpcSigner.signMessage sends)
  and `eth_chainId` when SIGNER_GATEWAY_CHAIN_ID is set. Batches are answered element by element.
- `POST /api/v1/eth1/sign/{identifier}` (address or public key): signs keccak256(data).
- `GET /upcheck`, `GET /healthcheck`.

Every signature goes through the Kafka path as a SignRequest (`eth_personal`, `eth_typed_data`,
`eth_tx`, `secp256k1_digest`); the enclave's policy applies to each.
"""

from __future__ import annotations

from typing import Any

import coincurve
from aiohttp import web

from schemas.keccak import keccak256
from schemas.refusals import Code

from .gateway import (
    Client,
    Gateway,
    GatewayCode,
    GatewayError,
    KeyInfo,
    error_body,
    hex_bytes,
    is_json_type,
    json_response,
    media_type,
    packable,
    parse_json,
    read_body,
)

# JSON-RPC error codes: the JSON-RPC 2.0 specification's, Web3Signer's -32000 "No unlocked account
# matches the Sender" and -40100 "Unauthorized", EIP-1474's -32003 and -32005
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
SERVER_ERROR, TX_REJECTED, LIMIT_EXCEEDED, UNAUTHORIZED = -32000, -32003, -32005, -40100
NO_ACCOUNT = "No unlocked account matches the Sender"
# Web3Signer answers Parse error, Invalid Request and Invalid params with HTTP 400, others with 200
_HTTP_400 = (PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS)


class RpcError(Exception):
    def __init__(
        self, code: int, message: str, data: Any = None, http_status: int | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data
        self.http_status = http_status if http_status is not None else (400 if code in _HTTP_400 else 200)
        self.retry_after = retry_after


def _rpc_error(exc: GatewayError) -> RpcError:
    """A gateway refusal as JSON-RPC."""
    data = {"code": exc.code, **({"request_id": exc.request_id} if exc.request_id else {})}
    if exc.code == GatewayCode.OVERLOADED:
        return RpcError(LIMIT_EXCEEDED, "Limit exceeded: " + exc.message, data, 429, exc.retry_after)
    if exc.code == GatewayCode.FORBIDDEN:
        return RpcError(SERVER_ERROR, NO_ACCOUNT)  # a key the client may not use is not one it can see
    if exc.code == GatewayCode.UNAUTHORIZED:
        return RpcError(UNAUTHORIZED, "Unauthorized: " + exc.message, data, 401)
    if exc.http_status in (400, 413):
        return RpcError(INVALID_PARAMS, "Invalid params: " + exc.message, data, 400)
    return RpcError(SERVER_ERROR, exc.message, data, exc.http_status, exc.retry_after)


def _bad_input_codes() -> frozenset[str]:
    from schemas.refusals import Surface

    return frozenset(
        {Code.INVALID_TYPED_DATA, Code.TYPED_DATA_TOO_DEEP, Code.TYPED_DATA_TOO_LARGE, *Code.on(Surface.DLQ)}
    ) - {Code.POISON_REQUEST}


BAD_INPUT = _bad_input_codes()


def _signed(result: dict[str, Any]) -> dict[str, Any]:
    """The result of a signing that succeeded, else the JSON-RPC error its refusal maps to."""
    if result.get("status") == "ok":
        return result
    err = result.get("error") or {}
    code, message = str(err.get("code", "")), str(err.get("message", ""))
    data = {"code": code, "status": result.get("status"), "request_id": result.get("request_id")}
    if code == Code.UNKNOWN_KEY:
        raise RpcError(SERVER_ERROR, NO_ACCOUNT, data)
    if code in BAD_INPUT:
        raise RpcError(INVALID_PARAMS, f"Invalid params: {code}: {message}", data)
    if result.get("status") == "rejected":
        raise RpcError(TX_REJECTED, f"Signing refused: {code}: {message}", data)
    raise RpcError(SERVER_ERROR, f"Signing failed ({result.get('status')}): {code}: {message}", data)


def _recovered(sig: bytes, digest: bytes) -> str:
    """The lower-case 0x address a 65-byte r||s||v signature (v 0/1 or 27/28) of a digest recovers to."""
    v = sig[64] - 27 if sig[64] >= 27 else sig[64]
    pub = coincurve.PublicKey.from_signature_and_message(sig[:64] + bytes((v,)), digest, hasher=None)
    return "0x" + keccak256(pub.format(compressed=False)[1:])[-20:].hex()


def _check_signer(sig: Any, digest: bytes | None, key: KeyInfo) -> str:
    """The signature as Web3Signer returns it (0x, lower-case hex, r||s||v with v 27/28), once it is
    checked to recover to the key's address (given the digest: the gateway does not compute EIP-712
    digests, which is the enclave's work)."""
    if type(sig) is not bytes or len(sig) != 65:
        raise RpcError(INTERNAL_ERROR, "Internal error: the result carries no secp256k1 signature")
    if sig[64] < 27:
        sig = sig[:64] + bytes((sig[64] + 27,))
    if key.address is None or (digest is not None and _recovered(sig, digest) != key.address.lower()):
        raise RpcError(INTERNAL_ERROR, "Internal error: the signature does not recover to the account's address")
    return "0x" + sig.hex()


def _params(call: dict[str, Any], n: int, name: str) -> list[Any]:
    params = call.get("params")
    if type(params) is not list or len(params) < n:
        raise RpcError(INVALID_PARAMS, f"Invalid params: {name} takes {n} parameters")
    return params


class Eth1:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def account(self, identifier: Any, client: Client) -> KeyInfo:
        if type(identifier) is not str or not identifier:
            raise RpcError(INVALID_PARAMS, "Invalid params: an account address is expected")
        key = await self.gw.keys.find(identifier)
        if key is None or key.scheme != "secp256k1" or not client.may_use(key.key_id, key.address):
            raise RpcError(SERVER_ERROR, NO_ACCOUNT)
        return key

    async def sign(self, client: Client, key: KeyInfo, scheme: str, payload: Any, deadline_ms: int) -> dict[str, Any]:
        m = {"key_id": key.key_id, "scheme": scheme, "payload": payload}
        try:
            with self.gw.admitted():
                return _signed(await self.gw.sign(m, client, deadline_ms))
        except GatewayError as exc:
            raise _rpc_error(exc) from None

    # -- methods -------------------------------------------------------------------------------------

    async def eth_accounts(self, call: dict[str, Any], client: Client, deadline_ms: int) -> Any:
        params = call.get("params")
        if params is not None and params != []:
            raise RpcError(INVALID_PARAMS, "Invalid params: eth_accounts takes none")
        await self.gw.keys.refresh()
        return sorted(
            k.address.lower()
            for k in self.gw.keys.by_id.values()
            if k.address and k.scheme == "secp256k1" and client.may_use(k.key_id, k.address)
        )

    async def _personal(self, address: Any, message: Any, client: Client, deadline_ms: int) -> str:
        key = await self.account(address, client)
        if type(message) is not str:
            raise RpcError(INVALID_PARAMS, "Invalid params: the message is a 0x-hex or text string")
        # as Web3Signer's EthMessageUtil: 0x-prefixed is hex, anything else is UTF-8 text
        if message[:2].lower() == "0x":
            try:
                data = bytes.fromhex(message[2:])
            except ValueError:
                raise RpcError(INVALID_PARAMS, "Invalid params: the message is not valid hex") from None
        else:
            data = message.encode()
        result = await self.sign(client, key, "eth_personal", data, deadline_ms)
        digest = keccak256(b"\x19Ethereum Signed Message:\n" + str(len(data)).encode() + data)
        return _check_signer(result.get("signature"), digest, key)

    async def eth_sign(self, call: dict[str, Any], client: Client, deadline_ms: int) -> Any:
        params = _params(call, 2, "eth_sign")
        if len(params) != 2:
            raise RpcError(INVALID_PARAMS, "Invalid params: eth_sign takes [address, message]")
        return await self._personal(params[0], params[1], client, deadline_ms)

    async def personal_sign(self, call: dict[str, Any], client: Client, deadline_ms: int) -> Any:
        params = _params(call, 2, "personal_sign")
        return await self._personal(params[1], params[0], client, deadline_ms)

    async def eth_signTypedData(self, call: dict[str, Any], client: Client, deadline_ms: int) -> Any:
        params = _params(call, 2, "eth_signTypedData")
        key = await self.account(params[0], client)
        doc = params[1]
        if type(doc) is str:  # Web3Signer takes the document as an object or as a JSON string
            doc = parse_json(doc.encode())
        if type(doc) is not dict:
            raise RpcError(INVALID_PARAMS, "Invalid params: the typed data is a JSON object")
        doc = _normal_chain_id(packable(doc))
        result = await self.sign(client, key, "eth_typed_data", doc, deadline_ms)
        return _check_signer(result.get("signature"), None, key)

    async def eth_signTransaction(self, call: dict[str, Any], client: Client, deadline_ms: int) -> Any:
        params = call.get("params")
        tx = params[0] if type(params) is list and len(params) == 1 else params
        if type(tx) is not dict:
            raise RpcError(INVALID_PARAMS, "Invalid params: eth_signTransaction takes one transaction object")
        key = await self.account(tx.get("from"), client)
        payload = self.transaction(tx, key)
        result = await self.sign(client, key, "eth_tx", payload, deadline_ms)
        raw = result.get("raw_tx")
        if type(raw) is not bytes:
            raise RpcError(INTERNAL_ERROR, "Internal error: the result carries no signed transaction")
        return "0x" + raw.hex()  # as Web3Signer: the signed transaction, RLP, 0x-hex

    async def eth_chainId(self, call: dict[str, Any], client: Client, deadline_ms: int) -> Any:
        if self.gw.cfg.chain_id is None:
            raise RpcError(METHOD_NOT_FOUND, "Method not found: set SIGNER_GATEWAY_CHAIN_ID to answer eth_chainId")
        return hex(self.gw.cfg.chain_id)

    def transaction(self, tx: dict[str, Any], key: KeyInfo) -> dict[str, Any]:
        """A JSON-RPC transaction object as an `eth_tx` payload: the same field names; `input` for
        `data`, `gasLimit` for `gas`; chainId from the object, else SIGNER_GATEWAY_CHAIN_ID."""
        allowed = {
            "from",
            "to",
            "gas",
            "gasLimit",
            "gasPrice",
            "maxFeePerGas",
            "maxPriorityFeePerGas",
            "nonce",
            "value",
            "data",
            "input",
            "chainId",
            "type",
            "accessList",
        }
        unknown = sorted(k for k, v in tx.items() if k not in allowed and v is not None)
        if unknown:
            raise RpcError(INVALID_PARAMS, f"Invalid params: transaction fields not supported: {unknown}")
        out: dict[str, Any] = {k: v for k, v in packable(tx).items() if v is not None}
        if "input" in out:
            data = out.pop("input")
            if out.setdefault("data", data) != data:
                raise RpcError(INVALID_PARAMS, "Invalid params: data and input differ")
        if "gasLimit" in out:
            out.setdefault("gas", out.pop("gasLimit"))
        if "nonce" not in out:  # as Web3Signer: eth_signTransaction needs the nonce
            raise RpcError(INVALID_PARAMS, "Invalid params: the transaction has no nonce")
        if "chainId" not in out:
            if self.gw.cfg.chain_id is None:
                raise RpcError(
                    INVALID_PARAMS,
                    "Invalid params: the transaction has no chainId (and SIGNER_GATEWAY_CHAIN_ID is not set)",
                )
            out["chainId"] = self.gw.cfg.chain_id
        if "to" in out and out["to"] in ("", "0x"):
            del out["to"]
        assert key.address is not None
        out["from"] = key.address  # the enclave refuses to sign unless it is the key's own
        for name in ("type", "chainId", "nonce", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "value"):
            v = out.get(name)
            if type(v) is str and not v.startswith("0x"):
                try:  # decimal strings, as some clients send them
                    out[name] = int(v, 10)
                except ValueError:
                    raise RpcError(INVALID_PARAMS, f"Invalid params: {name} is not a quantity") from None
            elif type(v) is str and len(v) <= 18:
                try:
                    out[name] = int(v, 16)
                except ValueError:
                    raise RpcError(INVALID_PARAMS, f"Invalid params: {name} is not a quantity") from None
        return out


def _normal_chain_id(doc: Any) -> Any:
    """An EIP-712 domain chainId given as a string ("0x1", "1": ethers and others send them) as the
    integer it stands for: the digest is the same, and a key policy's chain_ids can then check it."""
    domain = doc.get("domain") if type(doc) is dict else None
    if type(domain) is dict and type(domain.get("chainId")) is str:
        text = domain["chainId"]
        try:
            n = int(text, 16) if text[:2].lower() == "0x" else int(text, 10)
        except ValueError:
            return doc
        if 0 <= n < 2**64:
            doc = {**doc, "domain": {**domain, "chainId": n}}
    return doc


METHODS = ("eth_accounts", "eth_sign", "personal_sign", "eth_signTypedData", "eth_signTransaction", "eth_chainId")
ALIASES = {"eth_signTypedData_v4": "eth_signTypedData"}


def _rpc_body(call_id: Any, result: Any = None, error: RpcError | None = None) -> dict[str, Any]:
    if error is not None:
        err: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.data is not None:
            err["data"] = error.data
        return {"jsonrpc": "2.0", "id": call_id, "error": err}
    return {"jsonrpc": "2.0", "id": call_id, "result": result}


def _rpc_response(body: Any, status: int = 200, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return json_response(body, status, headers)


def eth1_routes(gw: Gateway) -> list[web.RouteDef]:
    eth1 = Eth1(gw)

    async def one(
        call: Any, client: Client, deadline_ms: int, request: web.Request
    ) -> tuple[dict[str, Any], RpcError | None]:
        call_id = call.get("id") if type(call) is dict else None
        try:
            if type(call) is not dict or call.get("jsonrpc") != "2.0" or type(call.get("method")) is not str:
                raise RpcError(INVALID_REQUEST, "Invalid Request")
            name = ALIASES.get(call["method"], call["method"])
            if name not in METHODS:
                raise RpcError(METHOD_NOT_FOUND, "Method not found")
            request["route"] = f"jsonrpc:{call['method']}" if call["method"] in (*METHODS, *ALIASES) else "jsonrpc"
            result = await getattr(eth1, name)(call, client, deadline_ms)
            return _rpc_body(call_id, result), None
        except RpcError as exc:
            request["error_code"] = str(exc.data.get("code")) if isinstance(exc.data, dict) else str(exc.code)
            return _rpc_body(call_id, error=exc), exc

    async def rpc(request: web.Request) -> web.Response:
        request["route"] = "jsonrpc"
        try:
            with gw.admitted():
                client = gw.clients.identify(request)
                mt = media_type(request)
                if not is_json_type(mt):
                    raise RpcError(INVALID_REQUEST, f"Invalid Request: send application/json, not {mt}", None, 415)
                body = parse_json(await read_body(gw, request))
                deadline_ms, _ = gw.deadline(request, None)
        except GatewayError as exc:
            request["outcome"] = request["error_code"] = exc.code
            if exc.code == Code.MALFORMED:
                err = RpcError(PARSE_ERROR, "Parse error")
            elif exc.code == Code.TOO_LARGE:
                err = RpcError(INVALID_REQUEST, "Invalid Request: " + exc.message, None, 413)
            else:
                err = _rpc_error(exc)
            return _rpc_response(_rpc_body(None, error=err), err.http_status, err.retry_after)
        except RpcError as exc:
            request["outcome"] = request["error_code"] = str(exc.code)
            return _rpc_response(_rpc_body(None, error=exc), exc.http_status)
        if type(body) is list:  # a batch: each call answered in its own element, HTTP 200
            if not body or len(body) > gw.cfg.max_batch:
                err = RpcError(INVALID_REQUEST, f"Invalid Request: a batch holds 1-{gw.cfg.max_batch} calls")
                return _rpc_response(_rpc_body(None, error=err), err.http_status)
            import asyncio

            answers = await asyncio.gather(*(one(c, client, deadline_ms, request) for c in body))
            request["route"] = "jsonrpc:batch"
            request["outcome"] = "batch"
            return _rpc_response([a for a, _ in answers])
        answer, error = await one(body, client, deadline_ms, request)
        request["outcome"] = "ok" if error is None else str(error.code)
        if error is None:
            return _rpc_response(answer)
        return _rpc_response(answer, error.http_status, error.retry_after)

    async def sign_for_identifier(request: web.Request) -> web.Response:
        """Web3Signer's ETH1_SIGN: {"data": 0x-hex} -> the signature of keccak256(data), as text/plain."""
        request["route"] = "eth1_sign"
        with gw.admitted():
            client = gw.clients.identify(request)
            if not is_json_type(media_type(request)):
                raise GatewayError(415, GatewayCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")
            body = parse_json(await read_body(gw, request))
            if type(body) is not dict or type(body.get("data")) is not str or not body["data"].strip():
                raise GatewayError(400, Code.MISSING_FIELD, 'the body must be {"data": "0x..."}')
            data = hex_bytes(body["data"], "data")
            key = await gw.keys.find(request.match_info["identifier"])
            if key is None or key.scheme != "secp256k1" or not client.may_use(key.key_id, key.address):
                raise GatewayError(404, GatewayCode.NOT_FOUND, "no key for this identifier")
            deadline_ms, _ = gw.deadline(request, None)
            digest = keccak256(data)
            m = {"key_id": key.key_id, "scheme": "secp256k1_digest", "payload": digest}
            result = await gw.sign(m, client, deadline_ms)
            request["outcome"] = result.get("status", "?")
            if result.get("status") != "ok":
                err = result.get("error") or {}
                request["error_code"] = str(err.get("code", "?"))
                body_out = error_body(str(err.get("code", "?")), str(err.get("message", "")), result.get("request_id"))
                status = 403 if result.get("status") == "rejected" else 400 if err.get("code") in BAD_INPUT else 500
                return json_response({**body_out, "status": result.get("status")}, status)
            try:
                sig = _check_signer(result.get("signature"), digest, key)
            except RpcError as exc:
                raise GatewayError(500, GatewayCode.GATEWAY_ERROR, exc.message) from None
            return web.Response(text=sig, content_type="text/plain", charset="utf-8")

    async def upcheck(_: web.Request) -> web.Response:
        return web.Response(text="OK", content_type="text/plain", charset="utf-8")

    async def healthcheck(request: web.Request) -> web.Response:
        checks = [
            {"id": "kafka", "status": "UP" if gw.kafka_ready and not gw.stopping else "DOWN"},
            {"id": "keys", "status": "UP" if gw.keys.loaded else "DOWN"},
        ]
        up = all(c["status"] == "UP" for c in checks)
        status = "UP" if up else "DOWN"
        return json_response({"status": status, "checks": checks, "outcome": status}, 200 if up else 503)

    return [
        web.post("/", rpc),
        web.post("/api/v1/eth1/sign/{identifier}", sign_for_identifier),
        web.get("/upcheck", upcheck),
        web.get("/healthcheck", healthcheck),
    ]
