"""Shadow vectors of an encoder swap: one modality's vectors from the incoming encoder, kept in their own
collection until the swap commits (MilvusStore.commit_swap), so serving never sees two vector spaces.

One collection per swapped modality, ``<items>_shadow_<modality>``: ``id`` VARCHAR pk and one
``vec`` FLOAT_VECTOR (one vector field per collection, as a Milvus 2.3 server requires). Its
``fusionrec.shadow`` property records the incoming encoder's version and dim, and whether the swap
has committed (``committed``: the items collection already serves the new vectors, and the
modality-vectors rows still being rewritten are finished at the next open).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from fusionrec.core.rules import VERSION_MAX_BYTES, as_vector, check_id, check_str
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.layout import F_ID, vec_out

PROP_SHADOW = "fusionrec.shadow"
SHADOW_INFIX = "_shadow_"
F_VEC = "vec"
SCAN_BATCH = 4096


def shadow_schema(dim: int):
    """(schema, [(vector field, index role)]) of a shadow collection."""
    from pymilvus import DataType, MilvusClient

    from fusionrec.core.rules import ID_MAX_BYTES

    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field(F_ID, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    s.add_field(F_VEC, DataType.FLOAT_VECTOR, dim=int(dim))
    return s, [(F_VEC, "modality")]


class ShadowVectors:
    """The shadow collection of ``modality`` next to items collection ``base``."""

    def __init__(self, conn: MilvusConnection, base: str, modality: str) -> None:
        self.conn = conn
        self.modality = modality
        self.name = f"{base}{SHADOW_INFIX}{modality}"

    def state(self) -> dict[str, Any] | None:
        """{"version", "dim", "committed"} of the swap in progress, or None."""
        c = self.conn.client
        try:
            if not c.has_collection(self.name):
                return None
            props = c.describe_collection(self.name).get("properties") or {}
            if PROP_SHADOW not in props:
                return None
            c.load_collection(self.name)  # released after a reopen; loading a loaded one is a no-op
        except Exception:  # dropped meanwhile: a committing swap drops its shadow without the caller's lock
            if c.has_collection(self.name):
                raise
            return None
        return json.loads(props[PROP_SHADOW])

    def begin(self, version: str, dim: int) -> bool:
        """Start (or, same version and dim, resume) filling shadow vectors of ``version``.
        Returns True when resuming; a shadow of another encoder is dropped first."""
        check_str(version, "encoder version", VERSION_MAX_BYTES)
        state = self.state()
        if state is not None and (state["version"], state["dim"]) == (version, int(dim)):
            return True
        self.drop()
        self.conn.create(self.name, shadow_schema(dim), {PROP_SHADOW: self._props(version, dim, False)})
        self.conn.client.load_collection(self.name)
        return False

    def mark_committed(self) -> None:
        state = self._require()
        self.conn.client.alter_collection_properties(
            self.name, {PROP_SHADOW: self._props(state["version"], state["dim"], True)})

    def put(self, vectors: dict[str, np.ndarray], state: dict[str, Any] | None = None) -> None:
        """Insert-or-replace shadow vectors by item id ((dim,) each); ``state``: as the caller just read it."""
        dim = int((state or self._require())["dim"])
        rows = [{F_ID: check_id(i), F_VEC: as_vector(v, dim, f"item {i!r} shadow {self.modality} vector")}
                for i, v in vectors.items()]
        if rows:
            self.conn.write(self.name, rows, 4 * dim + 512)
            self.conn.after_write(self.name, len(rows))

    def ids(self) -> set[str]:
        """Every item id holding a shadow vector."""
        out: set[str] = set()
        for batch in self.conn.iterate(self.name, SCAN_BATCH, [F_ID]):
            out.update(r[F_ID] for r in batch)
        return out

    def fetch(self, ids: list[str]) -> dict[str, np.ndarray]:
        rows = self.conn.fetch(self.name, ids, [F_ID, F_VEC])
        return {i: vec_out(r[F_VEC]) for i, r in rows.items()}

    def drop(self) -> None:
        if self.conn.client.has_collection(self.name):
            self.conn.forget_pending(self.name)
            self.conn.client.drop_collection(self.name)

    def _require(self) -> dict[str, Any]:
        state = self.state()
        if state is None:
            raise ValueError(f"no {self.modality} encoder swap in progress (begin one first)")
        return state

    @staticmethod
    def _props(version: str, dim: int, committed: bool) -> str:
        return json.dumps({"version": version, "dim": int(dim), "committed": committed})
