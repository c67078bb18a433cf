"""Where items' per-modality vectors live: one collection with a vector field per modality (Milvus Lite),
or one collection per modality (a Milvus server before 2.4 takes one vector field per collection).

Both take and give the same "packed" rows that ItemRows makes and reads (``id``, ``vec_<m>`` per
modality, ``modalities``, ``versions``, ``content``), so the rest of the store does not care which.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fusionrec.retrieval.base import SchemaMismatch, StoreSchema
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.expressions import id_list
from fusionrec.retrieval.layout import (
    F_CONTENT,
    F_ID,
    F_MODALITIES,
    F_VEC,
    F_VERSION,
    F_VERSIONS,
    MODALITY_SUFFIX,
    PROP_FORMAT,
    PROP_ROLE,
    QUERY_CHUNK,
    STORE_FORMAT,
    VEC_PREFIX,
    modality_schema,
)


class PackedVectors:
    """Milvus Lite: every modality in one collection (``<items>_modality_vectors``)."""

    def __init__(self, conn: MilvusConnection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.collections = [name]

    def write(self, rows: list[dict], row_bytes: int) -> None:
        self.conn.write(self.name, rows, row_bytes)

    def after_write(self, n: int) -> None:
        self.conn.after_write(self.name, n)

    def fetch(self, ids: list[str]) -> dict[str, dict]:
        return self.conn.fetch(self.name, ids)

    def delete(self, expr: str) -> None:
        self.conn.client.delete(self.name, filter=expr)


class SplitVectors:
    """A Milvus server: ``<items>_vec_<modality>`` per modality, a row only where the item has it."""

    def __init__(self, conn: MilvusConnection, items: str, schema: StoreSchema) -> None:
        self.conn = conn
        self.dims = dict(schema.modality_dims)
        self.by_modality = {m: f"{items}{MODALITY_SUFFIX}{m}" for m in sorted(self.dims)}
        self.collections = list(self.by_modality.values())
        #: one thread per modality collection, and one for the caller's items read beside them
        self.pool = ThreadPoolExecutor(len(self.collections) + 1, thread_name_prefix="mvec")

    def open(self) -> None:
        """Create the missing modality collections, check the others' dims, load them all."""
        c = self.conn.client
        for m, name in self.by_modality.items():
            if not c.has_collection(name):
                self.conn.create(name, modality_schema(self.dims[m]),
                                 {PROP_FORMAT: STORE_FORMAT, PROP_ROLE: f"modality:{m}"})
            else:
                fields = {f["name"]: f.get("params") or {} for f in c.describe_collection(name).get("fields", [])}
                if int(fields.get(F_VEC, {}).get("dim", -1)) != self.dims[m]:
                    raise SchemaMismatch(f"Milvus collection '{name}' at {self.conn.where} holds "
                                         f"{fields.get(F_VEC, {}).get('dim')}-d {m} vectors, configured {self.dims[m]}")
            self.conn.load(name)

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    def write(self, rows: list[dict], row_bytes: int) -> None:
        for m, name in self.by_modality.items():
            have = [r for r in rows if m in r[F_MODALITIES]]
            lacking = [r[F_ID] for r in rows if m not in r[F_MODALITIES]]
            if have:
                self.conn.write(name, [self._row(r, m) for r in have], 4 * self.dims[m] + 512)
            for i in range(0, len(lacking), QUERY_CHUNK):  # an item that lost the modality
                self.conn.client.delete(name, filter=f"{F_ID} in {id_list(lacking[i:i + QUERY_CHUNK])}")

    def after_write(self, n: int) -> None:
        """Servers flush on their own."""

    @staticmethod
    def _row(packed: dict, m: str) -> dict:
        return {F_ID: packed[F_ID], F_VEC: packed[VEC_PREFIX + m], F_VERSION: packed[F_VERSIONS][m],
                F_CONTENT: (packed.get(F_CONTENT) or {}).get(m, "")}

    def fetch(self, ids: list[str]) -> dict[str, dict]:
        """Packed rows by id (absent: the item has no modality), the modalities queried concurrently."""
        names = list(self.by_modality.items())
        found = self.pool.map(lambda mn: self.conn.fetch(mn[1], ids), names)
        out: dict[str, dict] = {}
        for (m, _), rows in zip(names, found):
            for item_id, r in rows.items():
                p = out.setdefault(item_id, {F_ID: item_id, F_MODALITIES: [], F_VERSIONS: {}, F_CONTENT: {}})
                p[VEC_PREFIX + m] = r[F_VEC]
                p[F_MODALITIES].append(m)
                p[F_VERSIONS][m] = r[F_VERSION]
                if r.get(F_CONTENT):
                    p[F_CONTENT][m] = r[F_CONTENT]
        return out

    def delete(self, expr: str) -> None:
        for name in self.collections:
            self.conn.client.delete(name, filter=expr)
