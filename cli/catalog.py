"""The JSONL catalog format read by `fusionrec ingest` / `demo` and the benchmarks, checked row by row and
turned into protobuf. A bad row is a ``CatalogError`` that names ``file:line``, the field and the problem.

A catalog is two files of JSON Lines (one JSON object a line; blank lines are skipped).

``catalog.jsonl``: one item a line::

    {"id": "item-0001", "attributes": {"category": "cat", "year": 2019, "explicit": false},
     "text": "a calm photo of a tabby cat", "image": "media/item-0001.jpg", "audio": "media/item-0001.wav",
     "vectors": {"image": [0.1, ...], "text": {"values": [0.2, ...], "encoder_version": "clip-v1"}}}

- ``id`` (required): the item id, a string (an integer is turned into one); unique in the file.
- ``attributes`` (optional): name -> string, number or bool (the values filters match on).
- ``text`` (optional): the item's text, encoded by the server.
- ``image`` / ``audio`` (optional): paths of the media files, whose bytes are sent. A relative
  path is resolved against the folder that holds the catalog file (not the working folder), so a
  catalog and its ``media/`` move together; an absolute path is used as it is.
- ``vectors`` (optional): precomputed embeddings, modality -> a list of numbers, or
  ``{"values": [...], "encoder_version": "..."}`` to name the encoder that made them.
- At least one of text, image, audio, vectors; any other field is an error (a typo would be lost).

``interactions.jsonl``: one user event a line::

    {"user_id": "user-001", "item_id": "item-0001", "kind": "like", "timestamp_s": 1704067200.0}

- ``user_id``, ``item_id`` (required): strings (integers are turned into strings).
- ``kind`` (optional, default ``""``): e.g. view / like / play.
- ``timestamp_s`` (optional, default 0 = now): seconds since the epoch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from fusionrec.client.messages import attributes_to_pb
from fusionrec.core.errors import InvalidArgument
from fusionrec.core.rules import check_attributes, check_id, check_kind
from fusionrec.v1 import recommender_pb2 as pb

ITEM_FIELDS = ("id", "attributes", "text", "image", "audio", "vectors")
INTERACTION_FIELDS = ("user_id", "item_id", "kind", "timestamp_s")
MEDIA_FIELDS = ("image", "audio")


class CatalogError(ValueError):
    """One bad line: ``path:line: field: problem``."""

    def __init__(self, path: Path, line: int, field_name: str, problem: str) -> None:
        self.path, self.line, self.field, self.problem = Path(path), line, field_name, problem
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.problem}"


@dataclass
class CatalogRow:
    """A checked catalog line; media are paths, read only when the row is sent."""

    path: Path
    line: int
    item_id: str
    text: str = ""
    media: dict[str, Path] = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)
    vectors: list[pb.ModalityVector] = field(default_factory=list)


def _json_lines(path: Path) -> Iterator[tuple[int, Union[dict, CatalogError]]]:
    """(line number, object or the error that line is) for each non-blank line."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8").strip())
            except UnicodeDecodeError as err:
                yield line_no, CatalogError(path, line_no, "line", f"not UTF-8 text (byte {err.start + 1})")
                continue
            except json.JSONDecodeError as err:
                yield line_no, CatalogError(path, line_no, "line", f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(obj, dict):
                yield line_no, CatalogError(path, line_no, "line", f"a JSON object is expected, got {type(obj).__name__}")
                continue
            yield line_no, obj


def read_jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of a JSONL file, one a non-blank line; a bad line raises CatalogError (a ValueError)."""
    for _, obj in _json_lines(Path(path)):
        if isinstance(obj, CatalogError):
            raise obj
        yield obj


def _an_id(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return check_id(value, "id")


def _media_path(value: object, base_dir: Path) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"a file path (string) is expected, got {type(value).__name__}")
    path = base_dir / value
    if not path.exists():
        raise InvalidArgument(f"no such file: {path}")
    if not path.is_file():
        raise InvalidArgument(f"not a file: {path}")
    if not os.access(path, os.R_OK):
        raise InvalidArgument(f"not readable: {path}")
    return path


def _vector(modality: str, spec: object) -> pb.ModalityVector:
    spec = spec if isinstance(spec, dict) else {"values": spec}
    values, version = spec.get("values"), spec.get("encoder_version", "")
    if not isinstance(values, list) or not values:
        raise InvalidArgument("a non-empty list of numbers is expected (or {\"values\": [...]})")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise InvalidArgument("every value must be a finite number")
    if not isinstance(version, str):
        raise InvalidArgument(f"encoder_version must be a string, got {type(version).__name__}")
    return pb.ModalityVector(modality=modality, values=values, encoder_version=version)


def _check(path: Path, line: int, name: str, check, *args):
    """check(*args), with a failure turned into this line's CatalogError for field ``name``."""
    try:
        return check(*args)
    except (InvalidArgument, TypeError, ValueError) as err:
        raise CatalogError(path, line, name, getattr(err, "message", str(err))) from None


def _vectors(value: object) -> list[pb.ModalityVector]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"an object (modality -> values) is expected, got {type(value).__name__}")
    return [_vector(m, spec) for m, spec in value.items()]


def _attributes(value: object) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"an object (name -> value) is expected, got {type(value).__name__}")
    return check_attributes(value, "item")


def _text(value: object) -> str:
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"a string is expected, got {type(value).__name__}")
    return value or ""


def parse_item(obj: dict, path: Path, line: int) -> CatalogRow:
    """A catalog object checked field by field (media paths must name readable files); CatalogError if not."""
    unknown = [k for k in obj if k not in ITEM_FIELDS]
    if unknown:
        raise CatalogError(path, line, unknown[0], f"unknown field (known: {', '.join(ITEM_FIELDS)})")
    if "id" not in obj:
        raise CatalogError(path, line, "id", "missing")
    row = CatalogRow(path, line, _check(path, line, "id", _an_id, obj["id"]))
    row.text = _check(path, line, "text", _text, obj.get("text"))
    for modality in MEDIA_FIELDS:
        media = _check(path, line, modality, _media_path, obj.get(modality), path.parent)
        if media is not None:
            row.media[modality] = media
    if obj.get("attributes") is not None:
        row.attributes = _check(path, line, "attributes", _attributes, obj["attributes"])
    if obj.get("vectors") is not None:
        row.vectors = _check(path, line, "vectors", _vectors, obj["vectors"])
    if not (row.text or row.media or row.vectors):
        raise CatalogError(path, line, "text", "the item has no text, image, audio or vectors")
    return row


def read_catalog(path: Path) -> Iterator[Union[CatalogRow, CatalogError]]:
    """Every item line of a catalog, checked: a CatalogRow, or the CatalogError that line is. An id seen on
    an earlier line is an error too (which line would win is not what the author meant)."""
    path = Path(path)
    first_line: dict[str, int] = {}
    for line, obj in _json_lines(path):
        if isinstance(obj, CatalogError):
            yield obj
            continue
        try:
            row = parse_item(obj, path, line)
        except CatalogError as err:
            yield err
            continue
        if row.item_id in first_line:
            yield CatalogError(path, line, "id", f"{row.item_id!r} is already on line {first_line[row.item_id]}")
            continue
        first_line[row.item_id] = line
        yield row


def row_to_pb(row: CatalogRow) -> pb.ItemInput:
    """The ItemInput of a checked row, media read now; a file that cannot be read is this row's CatalogError."""
    content = pb.Content(text=row.text)
    for modality, media in row.media.items():
        try:
            setattr(content, modality, media.read_bytes())
        except OSError as err:
            raise CatalogError(row.path, row.line, modality, f"cannot read {media}: {err.strerror or err}") from None
    return pb.ItemInput(item_id=row.item_id, content=content, vectors=row.vectors,
                        attributes=attributes_to_pb(row.attributes))


def item_to_pb(row: dict, base_dir: Path, line: int = 0) -> pb.ItemInput:
    """A catalog object -> ItemInput; ``image`` / ``audio`` paths are relative to ``base_dir``."""
    return row_to_pb(parse_item(row, Path(base_dir) / "<catalog>", line))


def catalog_batches(path: Path, batch_size: int) -> Iterator[list[pb.ItemInput]]:
    """The catalog in UpsertItems-sized batches; the first bad row raises its CatalogError."""
    batch: list[pb.ItemInput] = []
    for row in read_catalog(Path(path)):
        if isinstance(row, CatalogError):
            raise row
        batch.append(row_to_pb(row))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _timestamp(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"a non-negative number of seconds is expected, got {value!r}")
    return float(value)


def parse_interaction(obj: dict, path: Path, line: int) -> pb.Interaction:
    """An interactions object checked field by field; CatalogError if not."""
    unknown = [k for k in obj if k not in INTERACTION_FIELDS]
    if unknown:
        raise CatalogError(path, line, unknown[0], f"unknown field (known: {', '.join(INTERACTION_FIELDS)})")
    ids = {}
    for name in ("user_id", "item_id"):
        if name not in obj:
            raise CatalogError(path, line, name, "missing")
        ids[name] = _check(path, line, name, _an_id, obj[name])
    kind = _check(path, line, "kind", check_kind, obj.get("kind", ""))
    when = _check(path, line, "timestamp_s", _timestamp, obj.get("timestamp_s", 0))
    return pb.Interaction(user_id=ids["user_id"], item_id=ids["item_id"], kind=kind, timestamp_s=when)


def read_interactions(path: Path) -> Iterator[Union[pb.Interaction, CatalogError]]:
    """Every line of an interactions file: the Interaction, or the CatalogError that line is."""
    path = Path(path)
    for line, obj in _json_lines(path):
        if isinstance(obj, CatalogError):
            yield obj
            continue
        try:
            yield parse_interaction(obj, path, line)
        except CatalogError as err:
            yield err


def interaction_to_pb(row: dict) -> pb.Interaction:
    """An interactions object -> Interaction (CatalogError naming line 0 if it is bad)."""
    return parse_interaction(row, Path("<interactions>"), 0)
