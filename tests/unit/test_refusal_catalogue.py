"""One refusal catalogue: schemas/README.md documents exactly its codes, and no code is spelled
anywhere else in the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import msgpack
import pytest

from enclave_worker.policy import PolicyError, parse_policy
from schemas.admin import decode_admin_request
from schemas.errors import SchemaError
from schemas.names import NAME_RULE, valid_name
from schemas.records import RecordError, SealedKey
from schemas.refusals import RESULT_STATUSES, Code, Refused, Surface
from schemas.sign_result import SignResult

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "schemas" / "README.md"
SOURCES = ("enclave_worker", "schemas", "signer")

# every code published before the catalogue existed: the contract is public, so each one must
# stay with this exact wire value (new codes may be added)
PUBLISHED = {
    "deadline_passed", "unknown_key", "unknown_keyring", "kms_access_denied", "kms_throttled", "kms_unavailable",
    "kms_error", "kms_key_not_allowed", "kms_protocol", "scheme_mismatch", "sender_mismatch", "policy_scheme",
    "policy_chain_id", "policy_destination", "policy_value_cap", "policy_verifying_contract", "auth_required",
    "auth_bad_signature", "auth_stale", "auth_replayed", "auth_unknown_client", "auth_malformed",
    "typed_data_too_deep", "typed_data_too_large", "invalid_typed_data", "sealed_key_invalid", "invalid_policy",
    "key_unstable", "unsupported_scheme", "internal", "malformed", "too_large", "not_a_map", "unsupported_version",
    "missing_field", "wrong_type", "invalid_value", "unknown_scheme", "invalid_payload", "poison_request",
    "operation_unsigned", "operation_bad_signature", "operation_quorum", "operation_mismatch",
    "operation_wrong_enclave", "operation_expired", "operation_too_long", "operation_replayed", "operation_busy",
    "invalid_argument", "invalid_record", "import_undecryptable", "keyring_conflict", "enclave_unavailable",
    "too_many_keys", "unknown_op", "unsupported", "timeout", "frame_too_large", "frame_too_complex",
    "corrupt_frame", "credits_exceeded", "deferred_bytes_exceeded", "too_many_key_ops", "unknown_frame",
}  # fmt: skip


# -- the catalogue itself ---------------------------------------------------------------------------


def test_published_codes_keep_their_wire_values() -> None:
    assert PUBLISHED <= {c.value for c in Code}, sorted(PUBLISHED - {c.value for c in Code})


def test_each_entry_is_complete_and_consistent() -> None:
    assert len(Code.__members__) == len(list(Code)), "two entries share a wire value"
    for code in Code:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", code.value) and code.name == code.value.upper(), code
        assert code.surfaces and code.meaning and "|" not in code.meaning and "\n" not in code.meaning, code
        # a result status exactly for the codes a SignResult can carry
        assert (code.status in RESULT_STATUSES) if Surface.RESULT in code.surfaces else code.status is None, code
        if Surface.DLQ in code.surfaces:  # the enclave re-validates: every DLQ reason is also a result code
            assert Surface.RESULT in code.surfaces and code.status == "error", code


def test_the_status_comes_from_the_catalogue() -> None:
    r = SignResult.failure("r", "k", Code.POLICY_VALUE_CAP, "too much")
    assert (r.status, r.error) == ("rejected", {"code": "policy_value_cap", "message": "too much"})
    assert type(r.error["code"]) is str  # the wire carries the plain string
    assert SignResult.failure("r", "k", Code.DEADLINE_PASSED, "late").status == "expired"
    assert SignResult.refused("r", "k", SchemaError(Code.TOO_LARGE, "big")).status == "error"
    with pytest.raises(ValueError):
        SignResult.failure("r", "k", Code.OPERATION_QUORUM, "not a result code")
    with pytest.raises(ValueError):
        SignResult.failure("r", "k", "policy_value_cap", "a string is not a catalogue entry")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Refused("policy_value_cap", "a string is not a catalogue entry")  # type: ignore[arg-type]


def test_layers_raise_catalogue_codes() -> None:
    with pytest.raises(PolicyError) as policy:
        parse_policy({"nonsense": 1})
    assert policy.value.code is Code.INVALID_POLICY and isinstance(policy.value, Refused)
    with pytest.raises(RecordError) as record:
        SealedKey.from_wire([])
    assert record.value.code is Code.INVALID_RECORD and record.value.to_wire()["code"] == "invalid_record"


def test_a_relayed_code_outside_the_catalogue_is_not_passed_on() -> None:
    assert Refused.from_wire({"code": "kms_throttled", "message": "m"}).code is Code.KMS_THROTTLED
    for error in ({"code": "made_up", "message": "m"}, {"message": "m"}, None, {"code": 5}):
        assert Refused.from_wire(error).code is Code.INTERNAL


# -- schemas/README.md documents exactly the catalogue ----------------------------------------------


def _section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}\n", text, re.M)
    assert m, f"no heading {heading!r} in schemas/README.md"
    level = len(m[1])
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, m.end())
    return text[m.end() : end.start() if end else len(text)]


def _table(section: str, header: tuple[str, ...]) -> list[list[str]]:
    lines = section.splitlines()
    head = "| " + " | ".join(header) + " |"
    assert head in lines, f"no table {head!r}"
    i = lines.index(head) + 2  # past the |---| line
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([cell.strip() for cell in lines[i].strip()[1:-1].split(" | ")])
        i += 1
    return rows


def _code(cell: str) -> str:
    m = re.fullmatch(r"`([a-z0-9_]+)`", cell)
    assert m, f"{cell!r}: one code per row, in backticks"
    return m[1]


def _documented(rows: list[list[str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for code_cell, meaning in rows:
        code = _code(code_cell)
        assert code not in out, f"{code} documented twice"
        out[code] = meaning
    return out


def _expected(codes: list[Code], status: bool = False) -> str:
    """The rows the README should have (shown when it does not)."""
    if status:
        return "\n".join(f"| `{c.status}` | `{c.value}` | {c.meaning} |" for c in codes)
    return "\n".join(f"| `{c.value}` | {c.meaning} |" for c in codes)


README_TEXT = README.read_text()


def test_result_codes_table_is_the_catalogue() -> None:
    rows = _table(_section(README_TEXT, "Result error codes"), ("status", "code", "meaning"))
    dlq_row = [r for r in rows if r[1] == "any DLQ reason below"]
    assert len(dlq_row) == 1 and dlq_row[0][0] == "`error`", "the row standing for every DLQ reason"
    documented: dict[str, tuple[str, str]] = {}
    for status, code_cell, meaning in (r for r in rows if r not in dlq_row):
        code = _code(code_cell)
        assert code not in documented, f"{code} documented twice"
        documented[code] = (status.strip("`"), meaning)
    # DLQ reasons are documented in the DLQ table (and reach results through the row above)
    codes = [c for c in Code.on(Surface.RESULT) if Surface.DLQ not in c.surfaces]
    expected = {c.value: (str(c.status), c.meaning) for c in codes}
    assert documented == expected, "schemas/README.md result codes should read:\n" + _expected(codes, status=True)


def test_dlq_reasons_table_is_the_catalogue() -> None:
    rows = _table(_section(README_TEXT, "DLQ record (`sign.dlq`)"), ("reason", "meaning"))
    codes = list(Code.on(Surface.DLQ))
    assert _documented(rows) == {c.value: c.meaning for c in codes}, "DLQ reasons should read:\n" + _expected(codes)


def test_key_management_codes_table_is_the_catalogue() -> None:
    rows = _table(_section(README_TEXT, "Key management (`sign.admin`)"), ("code", "meaning"))
    codes = [c for c in Code if c.surfaces & {Surface.ADMIN, Surface.CLIENT}]
    expected = {c.value: c.meaning for c in codes}
    assert _documented(rows) == expected, "key management codes should read:\n" + _expected(codes)


def test_frame_codes_table_is_the_catalogue() -> None:
    rows = _table(_section(README_TEXT, "Host <-> enclave frames (internal)"), ("code", "meaning"))
    codes = list(Code.on(Surface.FRAME))
    assert _documented(rows) == {c.value: c.meaning for c in codes}, "frame codes should read:\n" + _expected(codes)


def test_every_surface_is_documented() -> None:
    # each surface has its table above (CLIENT codes sit in the key management table)
    assert set(Surface) == {Surface.RESULT, Surface.DLQ, Surface.ADMIN, Surface.FRAME, Surface.CLIENT}


# -- no code outside the catalogue, anywhere in the source ------------------------------------------


def _sources() -> list[Path]:
    return sorted(p for pkg in SOURCES for p in (ROOT / pkg).rglob("*.py"))


def _refusal_classes(trees: dict[Path, ast.Module]) -> dict[str, bool]:
    """Every subclass of Refused defined in the source -> whether its constructor takes the code
    (False: it fixes one, in its own super().__init__ call, which is checked too)."""
    classes: dict[str, tuple[list[str], bool | None]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in
                         node.bases]  # fmt: skip
                init = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
                takes = None if init is None else any(a.arg == "code" for a in init.args.args)
                classes[node.name] = (bases, takes)
    found = {"Refused": True}
    changed = True
    while changed:
        changed = False
        for name, (bases, takes) in classes.items():
            parent = next((b for b in bases if b in found), None)
            if name not in found and parent is not None:
                found[name] = found[parent] if takes is None else takes
                changed = True
    return found


def _code_problem(arg: ast.expr) -> str | None:
    if isinstance(arg, ast.Constant | ast.JoinedStr):
        return f"a literal {ast.unparse(arg)} (use a schemas.refusals.Code member)"
    if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "Code":
        if arg.attr not in Code.__members__:
            return f"Code.{arg.attr} is not in the catalogue"
    if isinstance(arg, ast.Call) and ast.unparse(arg.func) in ("Code", "Code.lookup"):
        return f"{ast.unparse(arg)}: a code looked up by a literal"
    return None


def _arg(call: ast.Call, index: int, name: str) -> ast.expr | None:
    if len(call.args) > index:
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_no_layer_spells_a_code_itself() -> None:
    trees = {p: ast.parse(p.read_text(), str(p)) for p in _sources()}
    classes = _refusal_classes(trees)
    assert {"SchemaError", "PolicyViolation", "TypedDataError", "FrameError", "KeyOpError", "AdminError"} <= set(
        classes
    )
    values = {c.value for c in Code}
    problems = []
    for path, tree in trees.items():
        where = path.relative_to(ROOT)
        in_catalogue = where == Path("schemas/refusals.py")
        log_events = {
            id(n.args[0])
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and ast.unparse(n.func.value) == "log"
            and n.args
        }  # fmt: skip
        fixing = {  # super().__init__ calls in refusal classes that fix their code
            id(call)
            for cls in ast.walk(tree)
            if isinstance(cls, ast.ClassDef) and cls.name in classes and cls.name != "Refused"
            for call in ast.walk(cls)
            if isinstance(call, ast.Call) and ast.unparse(call.func) == "super().__init__"
        }
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr)
        }  # fmt: skip
        for node in ast.walk(tree):
            checked: list[ast.expr | None] = []
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                last = func.rsplit(".", 1)[-1]
                if classes.get(last):  # Refused(code, ...) and the subclasses that take a code
                    checked.append(_arg(node, 0, "code"))
                elif last == "failure":  # SignResult.failure(request_id, key_id, code, message)
                    checked.append(_arg(node, 2, "code"))
                elif last == "DlqRecord":
                    checked.append(_arg(node, 0, "reason"))
                elif func == "super().__init__" and id(node) in fixing:
                    checked.append(_arg(node, 0, "code"))  # a subclass fixing its code
                elif last == "SignResult":  # only "ok" is built directly; refusals go through failure()
                    status = _arg(node, 2, "status")
                    if not (isinstance(status, ast.Constant) and status.value == "ok"):
                        problems.append(f"{where}:{node.lineno}: SignResult(...) built with a status other than ok")
            elif isinstance(node, ast.Dict):  # {"code": "...", ...} built by hand
                checked += [v for k, v in zip(node.keys, node.values, strict=True)
                            if isinstance(k, ast.Constant) and k.value in ("code", "reason")]  # fmt: skip
            elif (
                isinstance(node, ast.Constant) and node.value in values and not in_catalogue
                and id(node) not in log_events and id(node) not in docstrings
            ):  # fmt: skip
                problems.append(f"{where}:{node.lineno}: the code {node.value!r} spelled outside the catalogue")
            for arg in checked:
                problem = _code_problem(arg) if arg is not None else None
                if problem:
                    problems.append(f"{where}:{node.lineno}: {problem}")
    assert not problems, "\n".join(problems)


# -- one name rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("default", True), ("k_04f43b2b4a1120da3ef0", True), ("A-b_9", True), ("x" * 64, True),
        ("", False), ("x" * 65, False), ("a b", False), ("a.b", False), ("a/b", False), ("abc\n", False),
        ("é", False), ("٣", False), ("\uff4b", False), (None, False), (b"abc", False), (5, False),
    ],
)  # fmt: skip
def test_one_name_rule(name: object, ok: bool) -> None:
    assert valid_name(name) is ok
    # the admin request decoder applies the same rule to a keyring
    raw = msgpack.packb({"v": 1, "request_id": "r", "op": "enclave.identity", "args": {"keyring": name}})
    if name is None:
        return
    if ok:
        decode_admin_request(raw)
    else:
        with pytest.raises(SchemaError) as info:
            decode_admin_request(raw)
        assert info.value.code is Code.INVALID_VALUE and NAME_RULE in info.value.message


def test_the_name_rule_is_written_once() -> None:
    # the rule's character class, as a regex, a character set or in words (operator ids, with '.' and '@',
    # are another rule)
    spelled = re.compile(r"\[A-Za-z0-9_-\]|\[A-Za-z0-9-_\]|ascii_letters \+ string\.digits|letters, digits, '-' or '_'")
    elsewhere = [
        str(p.relative_to(ROOT))
        for p in _sources()
        if p.relative_to(ROOT) != Path("schemas/names.py") and spelled.search(p.read_text())
    ]
    assert not elsewhere, f"the keyring/key id rule is written outside schemas/names.py: {elsewhere}"
