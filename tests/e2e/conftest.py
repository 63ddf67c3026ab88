"""Every record the e2e runs write is checked against the schema (records.Record).

The schema is what analysis and users' scripts rely on; this checks it against what the
collector really writes (the worker's and the inline builder's records, every layout the
e2e tests produce), not against synthetic records: a field added by a builder without
its place in the schema fails the test that wrote it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from train_telemetry.records import read_records, validate_record


@pytest.fixture(autouse=True)
def _records_match_the_schema(request: pytest.FixtureRequest) -> Iterator[None]:
    root: Path | None = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if root is None:
        return
    for file in sorted(root.rglob("telemetry*.jsonl")):
        if file.is_symlink() or not file.is_file():
            continue  # the disk-full tests point the records at /dev/full: no records to read there
        for record in read_records(file):
            validate_record(record)  # raises RecordError naming the file's bad key path
