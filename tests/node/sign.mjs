// ethers v6 using the signer gateway as its JSON-RPC signer, as it would use Web3Signer.
// Env: GATEWAY_URL, GATEWAY_TOKEN, ADDRESS, CHAIN_ID. Prints one JSON line; exits non-zero on failure.
import { FetchRequest, JsonRpcProvider, Transaction, verifyMessage, verifyTypedData, getAddress } from "ethers";

const { GATEWAY_URL, GATEWAY_TOKEN, ADDRESS, CHAIN_ID } = process.env;
const req = new FetchRequest(GATEWAY_URL);
req.setHeader("Authorization", `Bearer ${GATEWAY_TOKEN}`);
const chainId = Number(CHAIN_ID);
const provider = new JsonRpcProvider(req, chainId, { staticNetwork: true });

const accounts = await provider.listAccounts();
const signer = await provider.getSigner(ADDRESS);
const expected = getAddress(ADDRESS);

const raw = await signer.signTransaction({
  type: 2, chainId, nonce: 3, to: "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", value: 10n ** 15n,
  gasLimit: 21000n, maxFeePerGas: 30n * 10n ** 9n, maxPriorityFeePerGas: 10n ** 9n,
});
const tx = Transaction.from(raw);

const message = "hello from ethers";
const msgSig = await signer.signMessage(message);

const domain = { name: "Ether Mail", version: "1", chainId, verifyingContract: "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC" };
const types = {
  Person: [{ name: "name", type: "string" }, { name: "wallet", type: "address" }],
  Mail: [{ name: "from", type: "Person" }, { name: "to", type: "Person" }, { name: "contents", type: "string" }],
};
const value = {
  from: { name: "Cow", wallet: "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826" },
  to: { name: "Bob", wallet: "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB" },
  contents: "Hello, Bob!",
};
const typedSig = await signer.signTypedData(domain, types, value);

const result = {
  accounts: accounts.map((a) => a.address),
  tx_from: tx.from, tx_hash: tx.hash, raw,
  message_signer: verifyMessage(message, msgSig),
  typed_signer: verifyTypedData(domain, types, value, typedSig),
};
console.log(JSON.stringify(result));
provider.destroy();
if (tx.from !== expected || result.message_signer !== expected || result.typed_signer !== expected) process.exit(1);
