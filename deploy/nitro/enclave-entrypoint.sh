#!/bin/sh
# Runs inside the Nitro Enclave. Everything the enclave trusts - the KMS endpoint and key ARNs,
# the operators' public keys, the quorum, attestation "nsm" - is in /app/enclave-config.json,
# baked into the image (its bytes are part of PCR0); nothing here or from the host changes it.
# The enclave has no network: KMS is reached through the parent instance's vsock-proxy (CID 3,
# port 8000), exposed here on 127.0.0.1 under the configuration's KMS host name, so the TLS
# certificate check and SigV4 see the real KMS host (https://kms.REGION.amazonaws.com).
set -eu
CONFIG=/app/enclave-config.json
WORKERS="${ENCLAVE_WORKERS:-2}"
KMS=$(python -c 'import json, sys, urllib.parse
u = urllib.parse.urlsplit(json.load(open(sys.argv[1]))["kms"]["endpoint"])
print(u.hostname, u.port or 443)' "$CONFIG")
KMS_HOST="${KMS% *}"
KMS_PORT="${KMS#* }"
echo "127.0.0.1 ${KMS_HOST}" >> /etc/hosts
socat "TCP-LISTEN:${KMS_PORT},bind=127.0.0.1,fork,reuseaddr" VSOCK-CONNECT:3:8000 &
# one worker process per vCPU, on vsock ports 5000, 5001, ...
i=0
while [ "$i" -lt "$WORKERS" ]; do
  python -m enclave_worker --config "$CONFIG" --listen "vsock://4294967295:$((5000 + i))" --enclave-id "enclave-$i" &
  i=$((i + 1))
done
wait
