#!/usr/bin/env bash
# Build the enclave image and the EIF; print the measurements. PCR0 goes into the KMS key policy
# (deploy/nitro/kms-key-policy.json). Run on the parent EC2 instance (nitro-cli installed).
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG="${1:-enclave-signer-enclave:latest}"
OUT="${2:-enclave-signer.eif}"
docker build -f deploy/nitro/Dockerfile.enclave -t "$TAG" .
nitro-cli build-enclave --docker-uri "$TAG" --output-file "$OUT" | tee "${OUT%.eif}.measurements.json"
echo "PCR0 (put it in the key policy):"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["Measurements"]["PCR0"])' "${OUT%.eif}.measurements.json"
