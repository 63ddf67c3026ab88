"""README.md's lists that are derived from code stay equal to the code: the diagnosis codes
and the table of silent bugs in "Reading a run" are those of the rules' registry."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from train_telemetry.analysis.rules import CODES, RULES, Rule
from train_telemetry.config import TelemetryConfig

README = Path(__file__).resolve().parents[2] / "README.md"
SEVERITIES = ("info", "warning", "serious")


def _section(title: str) -> str:
    """The text of README's ``## <title>...`` section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}.*?(?=^## )", text, re.S | re.M)
    assert match, f"README.md has no section '## {title}'"
    return match.group(0)


def _code_list() -> str:
    """The sentence of "Reading a run" that lists the diagnosis codes."""
    match = re.search(
        r"diagnoses \(codes in `--json`\):(.*?)Each names", _section("Reading a run"), re.S
    )
    assert match, (
        "README.md's 'Reading a run' no longer lists the codes as 'diagnoses (codes in `--json`): ...'"
    )
    return match.group(1)


def _silent_bug_table() -> list[tuple[str, str]]:
    """(code, what it names) for each row of the ``| code | what it names |`` table."""
    lines = _section("Reading a run").splitlines()
    start = lines.index("| code | what it names |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        match = re.fullmatch(r"\| `([^`]+)` \| (.*) \|", line)
        assert match, f"README.md: a row of the silent-bug table is not '| `code` | text |': {line}"
        rows.append((match.group(1), match.group(2)))
    return rows


def _listed_codes() -> list[str]:
    """The codes the list sentence names: its backquoted snake_case names, less the config
    fields it mentions beside a code (``lr_ratio_mismatch`` is judged against
    ``expected_lr_ratios``)."""
    config_fields = {f.name for f in msgspec.structs.fields(TelemetryConfig)}
    names = re.findall(r"`([a-z][a-z0-9_]*)`", _code_list())
    return [n for n in names if n not in config_fields]


def test_every_registered_code_is_in_the_readme_and_every_readme_code_is_registered() -> None:
    """README's code list plus its silent-bug table name exactly the registered codes, each once."""
    named = _listed_codes() + [code for code, _ in _silent_bug_table()]
    assert sorted(named) == sorted(set(named)), "a code is named twice in README.md"
    assert set(CODES) - set(named) == set(), "registered but missing from README.md"
    assert set(named) - set(CODES) == set(), "named in README.md but not a registered rule"


def test_the_silent_bug_table_is_the_silent_bug_rules_in_registry_order() -> None:
    """The table's rows are the ``silent_bug`` rules' codes and summaries, in the order of RULES,
    and the list sentence names the other rules."""
    assert _silent_bug_table() == [(r.code, r.summary) for r in RULES if r.silent_bug]
    assert set(_listed_codes()) == {r.code for r in RULES if not r.silent_bug}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.code)
def test_each_rule_has_a_code_a_severity_and_a_one_line_summary(rule: Rule) -> None:
    """Every registered rule has a unique snake_case code, a known severity and a one-line summary."""
    assert re.fullmatch(r"[a-z][a-z0-9_]*", rule.code)
    assert CODES.count(rule.code) == 1
    assert rule.severity in SEVERITIES
    assert rule.summary and "\n" not in rule.summary and "|" not in rule.summary
