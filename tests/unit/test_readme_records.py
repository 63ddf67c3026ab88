"""README.md's "What is recorded" table names exactly the record's typed keys (records.Record)."""

from __future__ import annotations

import re
from pathlib import Path

from train_telemetry.records import CORE_KEYS, HoldoutLogits

README = Path(__file__).resolve().parents[2] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    end = text.find("\n## ", start)
    return text[start : end if end >= 0 else None]


def table_keys(text: str) -> set[str]:
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return {key for row in rows for key in re.findall(r"`([^`]+)`", row.split(" | ")[0])}


def test_the_recorded_keys_table_lists_every_typed_key_and_no_other() -> None:
    """Every core key of Record has a row in the README's table, and every row is a core key (or the user's metric)."""
    documented = table_keys(section("### What is recorded")) - {"<your metric>"}
    assert documented == set(CORE_KEYS), (
        f"in Record but not in README: {sorted(set(CORE_KEYS) - documented)}; "
        f"in README but not in Record: {sorted(documented - set(CORE_KEYS))}")


def test_the_holdout_row_names_every_holdout_field() -> None:
    """The holdout_logits row names every field of HoldoutLogits (both layouts: classifier and sequence labels)."""
    rows = [line for line in section("### What is recorded").splitlines() if line.startswith("| `holdout_logits`")]
    assert len(rows) == 1
    named = set(re.findall(r"\b([a-z_]+)\b", rows[0]))
    assert set(HoldoutLogits.__struct_fields__) <= named, set(HoldoutLogits.__struct_fields__) - named
