#!/usr/bin/env bash
# Start the enclave with its CPU and memory sizing. One enclave worker process runs per vCPU
# (ENCLAVE_WORKERS in the image defaults to 2). Memory: ~256 MiB per worker plus the image.
set -euo pipefail
EIF="${1:-enclave-signer.eif}"
CPUS="${ENCLAVE_CPUS:-2}"
MEMORY_MIB="${ENCLAVE_MEMORY_MIB:-2048}"
CID="${ENCLAVE_CID:-16}"
nitro-cli run-enclave --eif-path "$EIF" --cpu-count "$CPUS" --memory "$MEMORY_MIB" --enclave-cid "$CID"
nitro-cli describe-enclaves
# the host worker reaches the workers as vsock://CID:5000, vsock://CID:5001, ...
echo "SIGNER_ENCLAVES=$(seq -s, -f "vsock://${CID}:%g" 5000 $((5000 + CPUS - 1)))"
