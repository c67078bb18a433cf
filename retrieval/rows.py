"""ItemRows: StoredItems to Milvus rows (items + modality vectors) and back, checked against a StoreSchema."""

from __future__ import annotations

from typing import Any

import numpy as np

from fusionrec.core.rules import as_vector, check_attr_value, check_id
from fusionrec.retrieval.base import AttributeValue, SchemaMismatch, StoredItem, StoreSchema
from fusionrec.retrieval.content import check_digest
from fusionrec.retrieval.expressions import attr_field
from fusionrec.retrieval.layout import (
    ATTR_PREFIX,
    DUMMY_DIM,
    F_CONTENT,
    F_FUSED,
    F_ID,
    F_MODALITIES,
    F_MODEL_VERSION,
    F_MVEC_DUMMY,
    F_VERSIONS,
    VEC_PREFIX,
    vec_out,
)


def attrs_from_row(row: dict) -> dict[str, AttributeValue]:
    """The attributes of an items row (dynamic keys ``attr_<name>``)."""
    n = len(ATTR_PREFIX)
    return {k[n:]: v for k, v in row.items() if k.startswith(ATTR_PREFIX)}


class ItemRows:
    """The rows of one StoreSchema: what a write stores and what a read assembles.

    Args:
        content_field: whether the modality-vectors collection has the ``content`` field
            (stores created before content retention lack it: content hashes are then not
            written, and read back as none).
    """

    def __init__(self, schema: StoreSchema, content_field: bool = True) -> None:
        self.schema = schema
        self.content_field = content_field
        self.modalities = sorted(schema.modality_dims)
        #: approximate bytes of one row, to size write calls
        self.item_row_bytes = 4 * schema.fused_dim + 1024
        self.mvec_row_bytes = 4 * (sum(schema.modality_dims.values()) + DUMMY_DIM) + 512

    def prepare(self, item: StoredItem) -> tuple[dict, dict]:
        """(items row, modality-vectors row) of ``item``; raises for anything the schema refuses."""
        item_id = check_id(item.item_id)
        mv = item.model_version
        if mv != self.schema.model_version:  # before the shape: another model's vector may have another dim
            raise SchemaMismatch(
                f"item {item_id!r}: fused vector from model version {mv!r}, but this store holds "
                f"model version {self.schema.model_version!r}; re-run the item tower with the "
                f"configured model or open a store configured for {mv!r}."
            )
        fused = as_vector(item.fused, self.schema.fused_dim, f"item {item_id!r} fused")
        mrow = self._modality_row(item_id, item)
        irow: dict[str, Any] = {F_ID: item_id, F_FUSED: fused, F_MODEL_VERSION: mv}
        for name, value in (item.attributes or {}).items():
            irow[attr_field(name)] = check_attr_value(name, value)
        return irow, mrow

    def prepare_batch(self, items: list[StoredItem]) -> tuple[list[dict], list[dict]]:
        """(items rows, modality-vectors rows), every item checked before anything is written; last one wins."""
        by_id: dict[str, tuple[dict, dict]] = {}
        for item in items:
            irow, mrow = self.prepare(item)
            by_id.pop(irow[F_ID], None)
            by_id[irow[F_ID]] = (irow, mrow)
        return [r for r, _ in by_id.values()], [r for _, r in by_id.values()]

    def _modality_row(self, item_id: str, item: StoredItem) -> dict[str, Any]:
        vectors = item.modality_vectors or {}
        unknown = set(vectors) - set(self.schema.modality_dims)
        if unknown:
            raise ValueError(
                f"item {item_id!r}: unknown modalities {sorted(unknown)} "
                f"(store has {self.modalities})"
            )
        versions: dict[str, str] = {}
        mrow: dict[str, Any] = {F_ID: item_id}
        for m in self.modalities:
            dim = self.schema.modality_dims[m]
            if m in vectors and vectors[m] is not None:
                mrow[VEC_PREFIX + m] = as_vector(vectors[m], dim, f"item {item_id!r} {m} vector")
                # a modality without an encoder version (bring-your-own only) takes the vectors' label
                want = self.schema.encoder_versions.get(m)
                got = (item.encoder_versions or {}).get(m, want or "")
                if want is not None and got != want:
                    raise SchemaMismatch(
                        f"item {item_id!r}: {m} vector from encoder version {got!r}, but this "
                        f"store holds {m} encoder version {want!r}; re-encode with the "
                        f"configured encoder or open a store configured for {got!r}."
                    )
                versions[m] = got
            else:
                mrow[VEC_PREFIX + m] = np.zeros(dim, dtype=np.float32)
        if not self.modalities:
            mrow[F_MVEC_DUMMY] = np.zeros(DUMMY_DIM, dtype=np.float32)
        mrow[F_MODALITIES] = sorted(versions)
        mrow[F_VERSIONS] = versions
        if self.content_field:
            mrow[F_CONTENT] = self._content(item_id, item)
        return mrow

    def _content(self, item_id: str, item: StoredItem) -> dict[str, str]:
        content = dict(item.content or {})
        unknown = set(content) - set(self.schema.modality_dims)
        if unknown:
            raise ValueError(f"item {item_id!r}: content kept for unknown modalities {sorted(unknown)}")
        return {m: check_digest(h) for m, h in sorted(content.items())}

    def assemble(self, irows: dict[str, dict], mrows: dict[str, dict]) -> dict[str, StoredItem]:
        """StoredItems from items rows and their modality-vectors rows, by id."""
        out: dict[str, StoredItem] = {}
        for item_id, ir in irows.items():
            mr = mrows.get(item_id, {})
            present = list(mr.get(F_MODALITIES) or [])
            vectors = {
                m: vec_out(mr[VEC_PREFIX + m])
                for m in present
                if m in self.schema.modality_dims and VEC_PREFIX + m in mr
            }
            versions = dict(mr.get(F_VERSIONS) or {})
            out[item_id] = StoredItem(
                item_id=item_id,
                attributes=attrs_from_row(ir),
                modality_vectors=vectors,
                fused=vec_out(ir[F_FUSED]),
                encoder_versions={m: versions.get(m, self.schema.encoder_versions.get(m, "")) for m in vectors},
                model_version=ir.get(F_MODEL_VERSION, ""),
                content=dict(mr.get(F_CONTENT) or {}),  # absent in stores older than content retention
            )
        return out

    def reindexed(self, items: list[StoredItem], vectors: np.ndarray) -> list[dict]:
        """Items rows of stored ``items`` with new fused ``vectors`` ((n, fused_dim), checked)."""
        rows = []
        for it, v in zip(items, vectors):
            row = {F_ID: it.item_id, F_FUSED: v, F_MODEL_VERSION: self.schema.model_version}
            row.update({ATTR_PREFIX + k: val for k, val in it.attributes.items()})
            rows.append(row)
        return rows
