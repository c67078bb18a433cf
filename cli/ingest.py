"""`fusionrec ingest`: a JSONL catalog (and its interactions) loaded through the service.

Every row is checked before anything is sent, so a bad row (bad JSON, wrong type, missing media file)
stops the run before its first batch, or is skipped and counted with ``skip_bad``. A row the service
rejects (say, an image it cannot decode) is found by splitting its batch and reported the same way.

Reruns are safe and resume: items whose id is already stored are skipped (checked with GetItem, so the
service is the record of what is done; ``resume=False`` upserts every row again, which is idempotent, e.g.
after editing rows). Interactions are appended by the service, so their progress is kept in a file under
``$FUSIONREC_HOME/ingest/`` keyed by target and file content; a rerun records only what is not recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from fusionrec.cli.catalog import CatalogError, CatalogRow, read_catalog, read_interactions, row_to_pb
from fusionrec.client import Client, InvalidArgumentError
from fusionrec.core.paths import home

Progress = Callable[[int], None]


@dataclass
class IngestReport:
    rows: int = 0  # good catalog rows
    upserted: int = 0
    already_stored: int = 0
    recorded: int = 0
    already_recorded: int = 0
    bad: list[CatalogError] = field(default_factory=list)


class IngestStopped(Exception):
    """Stopped on bad rows (``skip_bad`` off); ``report`` says what was done before."""

    def __init__(self, report: IngestReport, before_sending: bool) -> None:
        self.report, self.before_sending = report, before_sending
        super().__init__(f"{len(report.bad)} bad rows")


def _batches(rows: Iterator[CatalogRow], size: int) -> Iterator[list[CatalogRow]]:
    batch: list[CatalogRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_catalog(path: Path) -> tuple[int, list[CatalogError]]:
    """(good rows, bad rows) of a catalog, without reading media bytes."""
    good, bad = 0, []
    for row in read_catalog(path):
        if isinstance(row, CatalogError):
            bad.append(row)
        else:
            good += 1
    return good, bad


class _Loader:
    """Sends checked rows in batches; a row that cannot be read or that the service rejects is bad."""

    def __init__(self, client: Client, report: IngestReport, skip_bad: bool, progress: Progress) -> None:
        self.client, self.report, self.skip_bad, self.progress = client, report, skip_bad, progress

    def bad_row(self, err: CatalogError) -> None:
        self.report.bad.append(err)
        if not self.skip_bad:
            raise IngestStopped(self.report, before_sending=False)
        self.progress(1)

    def batch(self, rows: list[CatalogRow], resume: bool) -> None:
        if resume:
            stored = self.client.stored_ids(r.item_id for r in rows)
            self.report.already_stored += len(stored)
            self.progress(len(stored))
            rows = [r for r in rows if r.item_id not in stored]
        items = []
        for row in rows:
            try:
                items.append((row, row_to_pb(row)))
            except CatalogError as err:  # unreadable since the check
                self.bad_row(err)
        self.upsert(items)

    def upsert(self, items: list) -> None:
        """Upsert; on INVALID_ARGUMENT split the batch (all or nothing per call) down to the row at fault."""
        if not items:
            return
        try:
            self.report.upserted += self.client.upsert_items([pb for _, pb in items]).upserted
            self.progress(len(items))
        except InvalidArgumentError as err:
            if len(items) == 1:
                row = items[0][0]
                self.bad_row(CatalogError(row.path, row.line, "id", f"{row.item_id!r} rejected by the service: "
                                          f"{err.message}"))
                return
            half = len(items) // 2
            self.upsert(items[:half])
            self.upsert(items[half:])


def load_catalog(client: Client, path: Path, *, batch_size: int = 32, skip_bad: bool = False, resume: bool = True,
                 progress_factory: Callable[[int], Progress] = lambda total: lambda n: None) -> IngestReport:
    """Upsert a JSONL catalog. Raises IngestStopped on a bad row unless ``skip_bad``; ServiceError when the
    service fails a call. ``progress_factory(total_rows)`` returns the callback told how many rows are done."""
    report = IngestReport()
    report.rows, report.bad = check_catalog(path)
    if report.bad and not skip_bad:
        raise IngestStopped(report, before_sending=True)
    loader = _Loader(client, report, skip_bad, progress_factory(report.rows))
    good = (r for r in read_catalog(path) if not isinstance(r, CatalogError))
    for batch in _batches(good, batch_size):
        loader.batch(batch, resume)
    return report


def _progress_file(target: str, path: Path) -> Path:
    digest = hashlib.sha256(f"{target}\n{path.resolve()}\n".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return home("ingest", f"interactions-{digest.hexdigest()[:20]}.json")


def _save_progress(progress_path: Path, target: str, path: Path, recorded: int) -> None:
    progress_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = progress_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"target": target, "file": str(path.resolve()), "recorded": recorded}) + "\n")
    os.replace(tmp, progress_path)  # atomic: a crash leaves the old count, never a torn file


def record_file(client: Client, path: Path, *, batch_size: int = 1000, skip_bad: bool = False,
                resume: bool = True, report: IngestReport | None = None) -> IngestReport:
    """Record a JSONL interactions file, resuming after the events a previous run recorded."""
    report = report or IngestReport()
    events, bad = [], []
    for event in read_interactions(path):
        (bad if isinstance(event, CatalogError) else events).append(event)
    report.bad += bad
    if bad and not skip_bad:
        raise IngestStopped(report, before_sending=True)
    progress_path = _progress_file(client.options.target, path)
    done = 0
    if resume and progress_path.is_file():
        done = min(int(json.loads(progress_path.read_text()).get("recorded", 0)), len(events))
    report.already_recorded += done
    for start in range(done, len(events), batch_size):
        chunk: Sequence = events[start:start + batch_size]
        report.recorded += client.record_interactions(chunk).recorded
        _save_progress(progress_path, client.options.target, path, start + len(chunk))
    if not events[done:]:
        _save_progress(progress_path, client.options.target, path, len(events))
    return report
