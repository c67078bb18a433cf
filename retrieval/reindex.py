"""Re-indexing: a new items collection holding fused vectors recomputed from the stored modality vectors.

MilvusStore.reindex builds it with ``build_items`` while readers keep the old one, then commits
the switch with one property write (Lite has no aliases) and drops the old collection.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import numpy as np

from fusionrec.retrieval.base import StoredItem, StoreSchema
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.item_collections import REINDEX_SEP, items_properties
from fusionrec.retrieval.layout import items_schema
from fusionrec.retrieval.mirror import ItemMirror
from fusionrec.retrieval.rows import ItemRows
from fusionrec.retrieval.schema_meta import modality_differences, validate_schema

#: fn of ``reindex``: a batch of stored items -> (n, new fused_dim) float32 vectors
ReindexFn = Callable[[list[StoredItem]], np.ndarray]


def check_reindex_schema(current: StoreSchema, new_schema: StoreSchema) -> None:
    """Raise ValueError unless ``new_schema`` changes only the fused space of ``current``."""
    validate_schema(new_schema)
    diffs = modality_differences(current, new_schema)
    if diffs:
        raise ValueError(
            "reindex recomputes fused vectors only; the modality vectors would change:\n"
            + "".join(f"  - {d}\n" for d in diffs)
        )


def next_items_name(configured: str, active: str) -> str:
    """``<configured>__r<n+1>`` after ``<configured>__r<n>`` (``__r1`` after the configured name)."""
    m = re.fullmatch(re.escape(configured) + re.escape(REINDEX_SEP) + r"(\d+)", active)
    n = int(m.group(1)) + 1 if m else 1
    return f"{configured}{REINDEX_SEP}{n}"


def _fused(fn: ReindexFn, batch: list[StoredItem], fused_dim: int) -> np.ndarray:
    vectors = np.asarray(fn(batch), dtype=np.float32)
    if vectors.shape != (len(batch), fused_dim):
        raise ValueError(f"reindex fn returned shape {vectors.shape}, expected ({len(batch)}, {fused_dim})")
    if not np.all(np.isfinite(vectors)):
        raise ValueError("reindex fn returned NaN or inf")
    return vectors


def build_items(conn: MilvusConnection, name: str, rows: ItemRows, batches: Iterable[list[StoredItem]],
                fn: ReindexFn, mirror: ItemMirror | None) -> int:
    """Create items collection ``name`` for ``rows.schema`` and fill it with ``fn``'s vectors.

    Every batch of stored items also goes into ``mirror`` (when given). Returns the number of
    items written; on any error the collection is dropped again and the error re-raised.
    """
    c = conn.client
    if c.has_collection(name):  # left over by an interrupted reindex
        c.drop_collection(name)
    conn.create(name, items_schema(rows.schema.fused_dim), items_properties(rows.schema))
    n = 0
    try:
        for batch in batches:
            vectors = _fused(fn, batch, rows.schema.fused_dim)
            conn.write(name, rows.reindexed(batch, vectors), rows.item_row_bytes)
            conn.after_write(name, len(batch))  # flushed as it fills (Lite: one flush at the end stalled searches)
            if mirror is not None:
                mirror.upsert([it.item_id for it in batch], vectors, [it.attributes for it in batch])
            n += len(batch)
        c.flush(name)
        conn.load(name)
        conn.wait_loaded()
    except BaseException:
        c.drop_collection(name)
        raise
    return n
