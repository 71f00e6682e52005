// A producer and consumer of the wire contract (schemas/README.md) in Node.js: kafkajs, @msgpack/msgpack,
// ethers v6 to verify. Written from the contract alone; run by tests/integration/test_gateway_node.py.
//
//   node contract.mjs check README   the `auth` test vector and the msgpack facts the contract states
//   node contract.mjs run README     the same, then requests through Kafka, each result verified
//
// `run` reads KAFKA_BOOTSTRAP, REQUEST_TOPIC, RESULT_TOPIC, KEY_ID, ADDRESS (a secp256k1 key without a
// policy), AUTH_KEY_ID, AUTH_ADDRESS (a key whose policy requires auth from CLIENT_ID, an ed25519 client
// with the private key seed CLIENT_SEED, hex), ED_KEY_ID, ED_PUBLIC_KEY (an ed25519 key, its public key
// as `signer keys create` prints it), DIGESTS (how many digest requests). It prints one JSON
// line and exits non-zero if any request is unanswered, answered twice, or wrongly signed.
import { encode, decode } from "@msgpack/msgpack";
import { Kafka, logLevel, Partitioners } from "kafkajs";
import {
  Transaction, Signature, getAddress, hexlify, keccak256, recoverAddress, verifyMessage, verifyTypedData,
} from "ethers";
import { createPrivateKey, createPublicKey, randomBytes, randomUUID, sign as nodeSign, verify } from "node:crypto";
import { readFileSync } from "node:fs";

const hex = (bytes) => Buffer.from(bytes).toString("hex");
const fail = (message) => { throw new Error(message); };

// -- integers: msgpack ints only ------------------------------------------------------------------

// @msgpack/msgpack in its default mode writes a Number that is a safe integer as the smallest msgpack
// int, and anything else (a fraction, or 2^53 and above) as a float64, which the signer refuses. So:
// Numbers only for safe integers (deadline_ms and ts_ms are), larger values as strings.
function strictInts(value, path = "request") {
  if (typeof value === "bigint") fail(`${path}: a BigInt (write it as a "0x" hex string)`);
  if (typeof value === "number" && !Number.isSafeInteger(value)) fail(`${path}: ${value} is not a safe integer`);
  if (value instanceof Uint8Array || value === null || typeof value !== "object") return;
  for (const [k, v] of Object.entries(value)) strictInts(v, `${path}.${k}`);
}

const quantity = (n) => "0x" + BigInt(n).toString(16); // eth_tx quantities, any size

function encodeRequest(request) {
  strictInts(request);
  return Buffer.from(encode(request)); // default mode: no useBigInt64
}

// -- auth: the canonical encoding -----------------------------------------------------------------

// maps with their keys sorted, recursively: `sortKeys` sorts by UTF-16 code units, which is the contract's
// code point order for every key that has no character beyond U+FFFF (payload keys are ASCII names)
export function canonicalEncoding(request, tsMs, nonce) {
  const body = ["signer-auth/v1", request.request_id, request.key_id, request.scheme, request.payload,
    request.deadline_ms ?? null, request.reply_topic ?? null, tsMs, nonce];
  strictInts(body, "auth");
  return Buffer.from(encode(body, { sortKeys: true }));
}

function ed25519Key(seedHex) { // a raw 32-byte seed as a Node KeyObject (PKCS#8 DER prefix + seed)
  return createPrivateKey({
    key: Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), Buffer.from(seedHex, "hex")]),
    format: "der", type: "pkcs8",
  });
}

function withAuth(request, clientId, key) {
  const tsMs = Date.now(), nonce = randomBytes(16);
  const sig = nodeSign(null, canonicalEncoding(request, tsMs, nonce), key); // ed25519 signs the bytes themselves
  return { ...request, auth: { client_id: clientId, ts_ms: tsMs, nonce, sig } };
}

// -- the contract's test vector and msgpack facts ------------------------------------------------------

function vectorFromReadme(path) {
  const text = readFileSync(path, "utf8");
  const start = text.indexOf("#### Test vector");
  const section = text.slice(start, text.indexOf("\n#", start + 1));
  const bytes = [...section.matchAll(/^\| `([0-9a-f ]+)` \|/gm)].map((m) => m[1].replaceAll(" ", "")).join("");
  const sig = section.match(/signature \(ed25519\):\s+`([0-9a-f]{128})`/);
  if (start < 0 || !bytes || !sig) fail("no test vector in " + path);
  return { bytes, sig: sig[1] };
}

export const VECTOR_REQUEST = {
  v: 1, request_id: "vector-1", key_id: "k_0123456789abcdef0123", scheme: "eth_tx",
  payload: {
    type: 2, chainId: 1, nonce: 7, to: "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", value: "0x10000000000000000",
    gas: 21000, maxFeePerGas: 30000000000, maxPriorityFeePerGas: 1000000000, data: Uint8Array.from([0xde, 0xad, 0xbe, 0xef]),
  },
  deadline_ms: 1800000000000, reply_topic: "sign.results",
};
const VECTOR_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"; // RFC 8032 7.1 TEST 1

function check(readme) {
  const expected = vectorFromReadme(readme);
  const encoding = canonicalEncoding(VECTOR_REQUEST, 1799999990000, Uint8Array.from({ length: 16 }, (_, i) => i));
  if (hex(encoding) !== expected.bytes) fail(`canonical encoding differs:\n${hex(encoding)}\n${expected.bytes}`);
  const sig = nodeSign(null, encoding, ed25519Key(VECTOR_SEED));
  if (hex(sig) !== expected.sig) fail("the vector's ed25519 signature differs");
  // what the contract says about @msgpack/msgpack, as measured on the installed version
  const big = { useBigInt64: true };
  const facts = {
    safe_integer: hex(encode(2 ** 53 - 1)), // cf (uint 64)
    above_2_53: hex(encode(2 ** 53)), // cb (float 64): refused
    deadline_bigint_mode: hex(encode(1800000000000, big)), // cb: a Number above 2^32 in BigInt mode
    small_bigint: hex(encode(5n, big)), // cf0000000000000005: always 9 bytes
    bigint_2_64_plus_5: hex(encode(2n ** 64n + 5n, big)), // wrapped to 5, silently
    uint64_decoded: decode(Buffer.from("cf0020000000000001", "hex")), // 2^53 + 1 decoded as a Number: 2^53
  };
  const want = { safe_integer: "cf001fffffffffffff", above_2_53: "cb4340000000000000",
    deadline_bigint_mode: "cb427a3185c5000000", small_bigint: "cf0000000000000005",
    bigint_2_64_plus_5: "cf0000000000000005", uint64_decoded: 2 ** 53 };
  for (const [k, v] of Object.entries(want)) if (facts[k] !== v) fail(`msgpack fact ${k}: ${facts[k]} != ${v}`);
  let threw = false;
  try { encode(5n); } catch { threw = true; }
  if (!threw) fail("msgpack fact: a BigInt without useBigInt64 should throw");
  return { vector: "ok", msgpack_facts: facts };
}

// -- requests through Kafka ------------------------------------------------------------------------

const TYPED = {
  types: {
    EIP712Domain: [{ name: "name", type: "string" }, { name: "chainId", type: "uint256" },
      { name: "verifyingContract", type: "address" }],
    Order: [{ name: "maker", type: "address" }, { name: "amount", type: "uint256" }, { name: "price", type: "uint256" },
      { name: "salt", type: "bytes32" }, { name: "memo", type: "bytes" }, { name: "delta", type: "int64" }],
  },
  primaryType: "Order",
  domain: { name: "Node example", chainId: 1, verifyingContract: "0xcccccccccccccccccccccccccccccccccccccccc" },
  message: {
    maker: "0xcd2a3d9f938e13cd947ec05abc7fe734df8dd826", // lower case: addresses are 20 bytes, case is not checked here
    amount: "1000000000000000000000000", // decimal string above 2^64
    price: "0x" + (2n ** 200n).toString(16), // hex string
    salt: "0x" + "ab".repeat(32), // bytes32 as 0x hex (or a 32-byte Uint8Array)
    memo: Uint8Array.from([1, 2, 3]), // bytes as msgpack bin
    delta: -5, // a negative int fits int64
  },
};

function sigWithV27(sig) { // secp256k1_digest and eth_tx signatures carry v = 0/1; ethers wants 27/28
  const s = Uint8Array.from(sig);
  if (s[64] < 27) s[64] += 27;
  return Signature.from(hexlify(s));
}

async function run(readme) {
  const summary = check(readme);
  const env = process.env;
  const address = getAddress(env.ADDRESS), authAddress = getAddress(env.AUTH_ADDRESS);
  const clientKey = ed25519Key(env.CLIENT_SEED);
  const deadline = () => Date.now() + 60_000; // unix ms: a safe integer, written as a msgpack uint 64
  const tag = randomUUID().slice(0, 8);
  const requests = []; // [request, expected status, verify(result) -> true]

  for (let i = 0; i < Number(env.DIGESTS); i++) {
    const digest = randomBytes(32);
    requests.push([{ v: 1, request_id: `node-${tag}-digest-${i}`, key_id: env.KEY_ID, scheme: "secp256k1_digest",
      payload: digest }, "ok", (r) => recoverAddress(hexlify(digest), sigWithV27(r.signature)) === address]);
  }
  const tx1559 = { type: 2, chainId: 11155111, nonce: 1, to: "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    value: quantity(2n ** 70n), gas: 21000, maxFeePerGas: quantity(30n * 10n ** 9n), maxPriorityFeePerGas: 10 ** 9,
    data: new Uint8Array(0) };
  const txCheck = (value, from) => (r) => {
    const tx = Transaction.from(hexlify(r.raw_tx));
    return tx.from === from && tx.value === value && tx.hash === hexlify(r.tx_hash);
  };
  requests.push([{ v: 1, request_id: `node-${tag}-tx1559`, key_id: env.KEY_ID, scheme: "eth_tx", payload: tx1559,
    deadline_ms: deadline() }, "ok", txCheck(2n ** 70n, address)]);
  requests.push([{ v: 1, request_id: `node-${tag}-txlegacy`, key_id: env.KEY_ID, scheme: "eth_tx",
    payload: { chainId: 1, nonce: 0, gasPrice: "0x3b9aca00", gas: 50000, value: 0, data: Uint8Array.from([0xa9, 0x05]),
      to: "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed" } }, "ok", txCheck(0n, address)]);
  for (const [name, message] of [["hello", Buffer.from("hello from node")], ["empty", new Uint8Array(0)]]) {
    requests.push([{ v: 1, request_id: `node-${tag}-personal-${name}`, key_id: env.KEY_ID, scheme: "eth_personal",
      payload: message }, "ok", (r) => verifyMessage(message, hexlify(r.signature)) === address]);
  }
  const edPublic = createPublicKey({ // the 32-byte raw key `keys create` prints, as SPKI DER
    key: Buffer.concat([Buffer.from("302a300506032b6570032100", "hex"), Buffer.from(env.ED_PUBLIC_KEY, "hex")]),
    format: "der", type: "spki",
  });
  for (const [name, message] of [["hello", Buffer.from("ed25519 from node")], ["empty", new Uint8Array(0)]]) {
    requests.push([{ v: 1, request_id: `node-${tag}-ed25519-${name}`, key_id: env.ED_KEY_ID, scheme: "ed25519",
      payload: message }, "ok", (r) => verify(null, message, edPublic, r.signature)]);
  }
  const { EIP712Domain, ...types } = TYPED.types;
  requests.push([{ v: 1, request_id: `node-${tag}-typed`, key_id: env.KEY_ID, scheme: "eth_typed_data",
    payload: TYPED }, "ok",
  (r) => verifyTypedData(TYPED.domain, types, TYPED.message, hexlify(r.signature)) === address]);
  // the key whose policy requires auth: requests signed by the registered client, and one without auth
  const authDigest = randomBytes(32);
  requests.push([withAuth({ v: 1, request_id: `node-${tag}-auth-digest`, key_id: env.AUTH_KEY_ID,
    scheme: "secp256k1_digest", payload: authDigest, deadline_ms: deadline() }, env.CLIENT_ID, clientKey), "ok",
  (r) => recoverAddress(hexlify(authDigest), sigWithV27(r.signature)) === authAddress]);
  requests.push([withAuth({ v: 1, request_id: `node-${tag}-auth-tx`, key_id: env.AUTH_KEY_ID, scheme: "eth_tx",
    payload: { ...tx1559, nonce: 2 }, deadline_ms: deadline(), reply_topic: env.RESULT_TOPIC },
  env.CLIENT_ID, clientKey), "ok", txCheck(2n ** 70n, authAddress)]);
  requests.push([{ v: 1, request_id: `node-${tag}-no-auth`, key_id: env.AUTH_KEY_ID, scheme: "secp256k1_digest",
    payload: randomBytes(32) }, "rejected", (r) => r.error.code === "auth_required" && !r.signature]);
  // the trap: BigInt mode writes deadline_ms (a Number above 2^32) as a float; it is refused, and answered
  const floatDeadline = { v: 1, request_id: `node-${tag}-float-deadline`, key_id: env.KEY_ID,
    scheme: "secp256k1_digest", payload: randomBytes(32), deadline_ms: deadline() };
  const floatBytes = Buffer.from(encode(floatDeadline, { useBigInt64: true }));

  const kafka = new Kafka({ clientId: "node-contract-example", brokers: env.KAFKA_BOOTSTRAP.split(","),
    logLevel: logLevel.WARN });
  const consumer = kafka.consumer({ groupId: `node-example-${tag}` }); // read_committed by default
  const producer = kafka.producer({ createPartitioner: Partitioners.DefaultPartitioner, idempotent: true });
  const answers = new Map(); // request_id -> [results]
  const expected = new Map(requests.map(([req, status, verify]) => [req.request_id, { status, verify }]));
  expected.set(floatDeadline.request_id, { status: "error", verify: (r) => r.error.code === "wrong_type" });
  let allAnswered;
  const done = new Promise((resolve) => { allAnswered = resolve; });
  await consumer.connect();
  await consumer.subscribe({ topic: env.RESULT_TOPIC, fromBeginning: true });
  await consumer.run({
    eachMessage: async ({ message }) => {
      const result = decode(message.value); // bytes come back as Uint8Array, small ints as Numbers
      if (!expected.has(result.request_id)) return;
      answers.set(result.request_id, [...(answers.get(result.request_id) ?? []), result]);
      if ([...expected.keys()].every((id) => answers.has(id))) allAnswered();
    },
  });
  await producer.connect();
  await producer.send({ topic: env.REQUEST_TOPIC, acks: -1, messages: [
    ...requests.map(([req]) => ({ key: req.key_id, value: encodeRequest(req) })),
    { key: floatDeadline.key_id, value: floatBytes },
  ] });
  const timer = setTimeout(() => allAnswered(), 90_000);
  await done;
  clearTimeout(timer);
  await producer.disconnect();
  await consumer.disconnect();

  const byStatus = {}, wrong = [];
  let verified = 0, duplicates = 0;
  for (const [id, { status, verify }] of expected) {
    const got = answers.get(id) ?? [];
    duplicates += Math.max(0, got.length - 1);
    if (got.length === 0) { wrong.push(`${id}: no answer`); continue; }
    const r = got[0];
    byStatus[r.status] = (byStatus[r.status] ?? 0) + 1;
    let ok = false;
    try { ok = r.status === status && verify(r); } catch (e) { wrong.push(`${id}: ${e.message}`); }
    if (ok) verified++;
    else wrong.push(`${id}: ${r.status} ${JSON.stringify(r.error ?? {})}`);
  }
  Object.assign(summary, { sent: expected.size, answered: answers.size, duplicates, verified, by_status: byStatus,
    wrong });
  return summary;
}

const [mode, readme] = process.argv.slice(2);
const out = mode === "run" ? await run(readme) : check(readme);
console.log(JSON.stringify(out));
if (out.wrong?.length || out.duplicates || (out.sent !== undefined && out.verified !== out.sent)) process.exit(1);
