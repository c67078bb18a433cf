"""Committing an encoder swap: every item's vectors of one modality replaced by its shadow vectors
(retrieval/shadow.py) and its fused vector recomputed, switched atomically like a re-index.

MilvusStore.commit_swap (1) checks that every item holding the modality has a shadow vector, (2) builds
a new items collection from the swapped vectors while readers keep the old one, (3) commits with one
property write, as ``reindex`` does, then (4) rewrites the modality-vectors rows from the shadow and
drops it. A crash during (4) leaves the shadow marked committed; the next open finishes (4).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator

from fusionrec.core.errors import FailedPrecondition, InvalidArgument
from fusionrec.retrieval.base import StoredItem, StoreSchema
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.rows import ItemRows
from fusionrec.retrieval.schema_meta import validate_schema
from fusionrec.retrieval.shadow import ShadowVectors


def check_swap_schema(current: StoreSchema, new_schema: StoreSchema, modality: str, shadow_version: str,
                      shadow_dim: int) -> None:
    """InvalidArgument unless ``new_schema`` changes only ``modality``'s encoder version (to the shadow's)
    and the fused space."""
    validate_schema(new_schema)
    if new_schema.modality_dims != current.modality_dims:
        raise InvalidArgument("an encoder swap keeps every modality and its dim; "
                              f"{current.modality_dims} -> {new_schema.modality_dims}")
    if int(shadow_dim) != current.modality_dims[modality]:
        raise InvalidArgument(f"the incoming {modality} encoder makes {shadow_dim}-d vectors, the store holds "
                              f"{current.modality_dims[modality]}-d ones: a swap to another dim is not supported")
    others = {m: v for m, v in new_schema.encoder_versions.items() if m != modality}
    if others != {m: v for m, v in current.encoder_versions.items() if m != modality}:
        raise InvalidArgument(f"an encoder swap of {modality} changes no other encoder's version")
    if new_schema.encoder_versions.get(modality) != shadow_version:
        raise InvalidArgument(f"the shadow vectors are {shadow_version!r}, not "
                              f"{new_schema.encoder_versions.get(modality)!r}")


def missing_shadow(batches: Iterable[list[StoredItem]], modality: str, have: set[str]) -> list[str]:
    """Ids of items holding ``modality`` without a shadow vector."""
    return [it.item_id for batch in batches for it in batch if modality in it.modality_vectors and it.item_id not in have]


def swapped(batches: Iterable[list[StoredItem]], modality: str, shadow: ShadowVectors, version: str
            ) -> Iterator[list[StoredItem]]:
    """The stored items with ``modality``'s vector and encoder version taken from the shadow."""
    for batch in batches:
        vectors = shadow.fetch([it.item_id for it in batch if modality in it.modality_vectors])
        out = []
        for it in batch:
            if modality in it.modality_vectors:
                it = replace(it, modality_vectors={**it.modality_vectors, modality: vectors[it.item_id]},
                             encoder_versions={**it.encoder_versions, modality: version})
            out.append(it)
        yield out


def require_complete(batches: Iterable[list[StoredItem]], shadow: ShadowVectors) -> None:
    """FailedPrecondition naming the items the re-encoding has not reached yet."""
    missing = missing_shadow(batches, shadow.modality, shadow.ids())
    if missing:
        raise FailedPrecondition(
            f"{len(missing)} items hold {shadow.modality} vectors but no shadow vector yet (e.g. {missing[:5]}): "
            "finish re-encoding first (items whose content was not kept must be upserted again or deleted)")


def rewrite_modality_rows(conn: MilvusConnection, mvec: str, rows: ItemRows, batches: Iterable[list[StoredItem]],
                          modality: str) -> int:
    """Write the modality-vectors rows of the (already swapped) items holding ``modality``."""
    n = 0
    for batch in batches:
        mine = [it for it in batch if modality in it.modality_vectors]
        if mine:
            conn.write(mvec, [rows.prepare(it)[1] for it in mine], rows.mvec_row_bytes)
            n += len(mine)
    return n
