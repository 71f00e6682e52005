#!/usr/bin/env bash
# Build the enclave image and the EIF; print the measurements. The image bakes in
# deploy/nitro/enclave-config.json (see README.md: it names the KMS key and the operators),
# so PCR0 covers code and configuration. PCR0 goes into the KMS key policy
# (deploy/nitro/kms-key-policy.json). Run on the parent EC2 instance (nitro-cli installed).
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG="${1:-enclave-signer-enclave:latest}"
OUT="${2:-enclave-signer.eif}"
CONFIG=deploy/nitro/enclave-config.json
if [ ! -f "$CONFIG" ]; then
  echo "no $CONFIG: write it from deploy/nitro/enclave-config.example.json (deploy/nitro/README.md)" >&2
  exit 2
fi
if grep -q REPLACE "$CONFIG"; then
  echo "$CONFIG still holds REPLACE... placeholders (KMS key ARN, operator public keys)" >&2
  exit 2
fi
docker build -f deploy/nitro/Dockerfile.enclave -t "$TAG" .
# the enclave's own parser, in the image: a configuration it would refuse fails the build here
docker run --rm --entrypoint python "$TAG" -c '
import sys
from enclave_worker.trust import ConfigError, load_config
try:
    config, _ = load_config("/app/enclave-config.json")
except ConfigError as exc:
    sys.exit(f"enclave-config.json: {exc}")
if config.attestation != "nsm" or not config.kms_endpoint.startswith("https://"):
    sys.exit("enclave-config.json: a Nitro image needs attestation \"nsm\" and an https:// KMS endpoint")
print("enclave configuration: KMS", config.kms_endpoint, "keys", list(config.key_arns),
      "operators", sorted(config.operators), "quorum", config.quorum)
print("configuration sha256 (reported in the enclave identity):", config.digest.hex())
'
nitro-cli build-enclave --docker-uri "$TAG" --output-file "$OUT" | tee "${OUT%.eif}.measurements.json"
echo "PCR0 (put it in the KMS key policy; operators pass it as --expect-pcr0 / SIGNER_EXPECT_PCR0):"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["Measurements"]["PCR0"])' "${OUT%.eif}.measurements.json"
