"""`signer up` starts a gateway and prints GATEWAY_URL beside the Kafka address; the README's web3.py
snippet, run as written, signs through it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from signer.topology import ChildProcess
from tests.conftest import ROOT


def _snippet() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- gateway-snippet -->\n```python\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]


def test_up_prints_gateway_url_and_the_readme_snippet_signs_through_it(bootstrap: str, tmp_path: Path) -> None:
    tag = os.urandom(4).hex()
    topics = {"SIGNER_TOPIC_REQUESTS": f"u{tag}.req", "SIGNER_TOPIC_RESULTS": f"u{tag}.res",
              "SIGNER_TOPIC_DLQ": f"u{tag}.dlq", "SIGNER_TOPIC_ADMIN": f"u{tag}.adm",
              "SIGNER_TOPIC_ADMIN_REPLIES": f"u{tag}.admr", "SIGNER_GROUP_ID": f"g-{tag}"}  # fmt: skip
    env = {"KAFKA_BOOTSTRAP": bootstrap, "SIGNER_HTTP_PORT": "0", "SIGNER_DATA_DIR": str(tmp_path / "data"),
           "SIGNER_ENCLAVE_PROCESSES": "1", **topics}  # fmt: skip
    up = ChildProcess("signer", ["up"], env, log=tmp_path / "up.log").spawn()
    try:
        assert up.wait_for_line("KAFKA_BOOTSTRAP=", timeout=180).split("=", 1)[1] == bootstrap
        url = up.wait_for_line("GATEWAY_URL=", timeout=10).split("=", 1)[1].strip()
        token = up.wait_for_line("GATEWAY_TOKEN=", timeout=10).split("=", 1)[1].strip()
        cli_env = {**env}
        for name in ("SIGNER_OPERATOR_KEY", "SIGNER_ATTESTATION_ROOT", "SIGNER_EXPECT_PCR0"):
            cli_env[name] = up.wait_for_line(f"export {name}=", timeout=10).split("=", 1)[1].strip()
        with urllib.request.urlopen(f"{url}/upcheck", timeout=10) as r:
            assert r.status == 200 and r.read() == b"OK"
        run = {**os.environ, "PYTHONPATH": str(ROOT), **cli_env}
        made = subprocess.run([sys.executable, "-m", "signer", "keys", "create"], env=run, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        assert made.returncode == 0, made.stderr
        out = subprocess.run([sys.executable, "-c", _snippet()], env={**run, "GATEWAY_URL": url, "GATEWAY_TOKEN": token},
                             capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert out.returncode == 0, out.stderr
    finally:
        code = up.stop(signal.SIGINT, timeout=60)
    assert code == 0
