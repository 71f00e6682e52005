#!/bin/sh
# Runs inside the Nitro Enclave. The enclave has no network: KMS is reached through the
# parent instance's vsock-proxy (CID 3, port 8000), exposed here as kms.<region>:443 so TLS
# and SigV4 see the real KMS host name.
set -eu
REGION="${SIGNER_KMS_REGION:-us-east-1}"
WORKERS="${ENCLAVE_WORKERS:-2}"
echo "127.0.0.1 kms.${REGION}.amazonaws.com" >> /etc/hosts
socat TCP-LISTEN:443,bind=127.0.0.1,fork,reuseaddr VSOCK-CONNECT:3:8000 &
export SIGNER_KMS_ENDPOINT="https://kms.${REGION}.amazonaws.com"
export ENCLAVE_ATTESTATION=nsm
# one worker process per vCPU, on vsock ports 5000, 5001, ...
i=0
while [ "$i" -lt "$WORKERS" ]; do
  python -m enclave_worker --listen "vsock://4294967295:$((5000 + i))" --enclave-id "enclave-$i" &
  i=$((i + 1))
done
wait
