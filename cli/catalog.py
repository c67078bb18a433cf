"""The JSONL catalog format read by `fusionrec ingest` / `demo` and the benchmarks, turned into protobuf.

A catalog is two files of JSON Lines (one JSON object a line; blank lines are skipped, any other
line that is not valid JSON is a ``ValueError`` naming ``file:line``).

``catalog.jsonl``: one item a line::

    {"id": "item-0001", "attributes": {"category": "cat", "year": 2019, "explicit": false},
     "text": "a calm photo of a tabby cat", "image": "media/item-0001.jpg", "audio": "media/item-0001.wav",
     "vectors": {"image": [0.1, ...], "text": {"values": [0.2, ...], "encoder_version": "clip-v1"}}}

- ``id`` (required): the item id; numbers are turned into strings.
- ``attributes`` (optional): name -> string, number or bool (the values filters match on);
  bools stay bools, ints and floats become numbers, anything else its ``str()``.
- ``text`` (optional): the item's text, encoded by the server.
- ``image`` / ``audio`` (optional): paths of the media files, whose bytes are sent. A relative
  path is resolved against the folder that holds the catalog file (not the working folder), so a
  catalog and its ``media/`` move together; an absolute path is used as it is.
- ``vectors`` (optional): precomputed embeddings, modality -> a list of floats, or
  ``{"values": [...], "encoder_version": "..."}`` to name the encoder that made them.

``interactions.jsonl``: one user event a line::

    {"user_id": "user-001", "item_id": "item-0001", "kind": "like", "timestamp_s": 1704067200.0}

- ``user_id``, ``item_id`` (required): strings (numbers are turned into strings).
- ``kind`` (optional, default ``""``): e.g. view / like / play.
- ``timestamp_s`` (optional, default 0): seconds since the epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.gateway.convert import value_to_pb


def read_jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of a JSONL file, one a non-blank line."""
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None


def item_to_pb(row: dict, base_dir: Path) -> pb.ItemInput:
    """A catalog line -> ItemInput; ``image`` / ``audio`` paths are relative to ``base_dir``."""
    content = pb.Content(text=row.get("text") or "")
    for modality in ("image", "audio"):
        if row.get(modality):
            setattr(content, modality, (base_dir / row[modality]).read_bytes())
    vectors = []
    for modality, vec in (row.get("vectors") or {}).items():
        spec = vec if isinstance(vec, dict) else {"values": vec}
        vectors.append(pb.ModalityVector(modality=modality, values=spec["values"],
                                         encoder_version=spec.get("encoder_version", "")))
    return pb.ItemInput(item_id=str(row["id"]), content=content, vectors=vectors,
                        attributes={k: value_to_pb(v) for k, v in (row.get("attributes") or {}).items()})


def catalog_batches(path: Path, batch_size: int) -> Iterator[list[pb.ItemInput]]:
    """The catalog in UpsertItems-sized batches (media resolved against the catalog's folder)."""
    batch: list[pb.ItemInput] = []
    for row in read_jsonl(path):
        batch.append(item_to_pb(row, path.parent))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def interaction_to_pb(row: dict) -> pb.Interaction:
    """An interactions line -> Interaction."""
    return pb.Interaction(user_id=str(row["user_id"]), item_id=str(row["item_id"]),
                          kind=row.get("kind", ""), timestamp_s=float(row.get("timestamp_s", 0)))
