"""Top-k search over the items collection, on either backend: the in-memory ItemMirror or Milvus.

Milvus Lite 3.2.2 pays 50-90 ms per search at 100k rows whatever the index, hence the mirror
(faiss HNSW + attribute columns) filled from the items collection at open. Both backends take
the same, already checked, query and return the same Candidates.
"""

from __future__ import annotations

import numpy as np

from fusionrec.core.rules import storable_id
from fusionrec.retrieval.base import AttributeValue, Candidate, FilterSpec, Hits, StoreSwitched
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.expressions import build_filter, filter_clause, id_list
from fusionrec.retrieval.layout import F_FUSED, F_ID, F_MODEL_VERSION, search_params, vec_out
from fusionrec.retrieval.mirror import ItemMirror
from fusionrec.retrieval.rows import attrs_from_row

SEARCH_BACKENDS = ("auto", "memory", "milvus")
MIRROR_LOAD_BATCH = 4096


def resolve_backend(backend: str, uri: str) -> str:
    """"memory" or "milvus" for ``backend`` at ``uri``: "auto" is memory on Milvus Lite (a ``.db`` file,
    one owner process) and milvus on a server, where replicas share the data and an in-memory copy in
    one of them would miss the others' writes (so "memory" is refused there)."""
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"search_backend must be one of {SEARCH_BACKENDS}, got {backend!r}")
    lite = uri.endswith(".db")
    if backend == "auto":
        return "memory" if lite else "milvus"
    if backend == "memory" and not lite:
        raise ValueError("search_backend 'memory' needs a Milvus Lite file (one owner process); with a "
                         "server the Retrieval replicas share the data and search it in Milvus: use 'milvus' or 'auto'")
    return backend


def load_mirror(conn: MilvusConnection, collection: str, fused_dim: int, index_params: dict) -> ItemMirror:
    """An ItemMirror of ``collection``'s rows (ids, fused vectors, attributes)."""
    mirror = ItemMirror(fused_dim, **index_params)
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    attrs: list[dict[str, AttributeValue]] = []
    for batch in conn.iterate(collection, MIRROR_LOAD_BATCH, ["*"]):
        ids.extend(r[F_ID] for r in batch)
        vectors.append(np.asarray([r[F_FUSED] for r in batch], dtype=np.float32))
        attrs.extend(attrs_from_row(r) for r in batch)
    if ids:
        mirror.upsert(ids, np.concatenate(vectors), attrs)
    return mirror


def search_mirror(
    mirror: ItemMirror, q: np.ndarray, k: int, filters: list[FilterSpec] | None, excluded: set[str],
    only_ids: set[str] | None = None,
) -> Hits:
    for spec in filters or []:  # same validation (and errors) as the Milvus path
        if filter_clause(spec) is None:
            return Hits.of([], mirror.dim)
    excluded = {i for i in excluded if storable_id(i)}
    return mirror.search_hits(q, k, filters, excluded, only_ids)


def search_milvus(
    conn: MilvusConnection, collection: str, q: np.ndarray, k: int, filters: list[FilterSpec] | None,
    excluded: set[str], only_ids: set[str] | None = None, model_version: str | None = None,
) -> list[Candidate]:
    """Top-k from Milvus. ``model_version``: the fusion model the caller's query belongs to; a hit
    from another (the store switched under the caller) raises StoreSwitched."""
    expr = build_filter(filters, excluded, server=not conn.is_lite)
    if expr is None:
        return []
    if only_ids is not None:
        only = sorted(i for i in only_ids if storable_id(i))
        if not only:
            return []
        expr = f"({expr}) and {F_ID} in {id_list(only)}" if expr else f"{F_ID} in {id_list(only)}"
    res = conn.client.search(
        collection,
        data=[q],
        anns_field=F_FUSED,
        limit=k,
        filter=expr,
        output_fields=["*"],
        search_params=search_params(conn.backend, k),
        **conn.consistency(),
    )
    hits = res[0] if res else []
    out = []
    for h in hits:
        ent = h.get("entity") or {}
        item_id = h.get("id", ent.get(F_ID))
        if item_id in excluded:  # belt and braces; the filter already excludes them
            continue
        if model_version is not None and ent.get(F_MODEL_VERSION) != model_version:
            raise StoreSwitched(f"item {item_id!r} holds a fused vector of model {ent.get(F_MODEL_VERSION)!r}, "
                                f"not {model_version!r}: the store switched")
        out.append(
            Candidate(
                item_id=item_id,
                score=float(h["distance"]),
                fused=vec_out(ent[F_FUSED]),
                attributes=attrs_from_row(ent),
            )
        )
    out.sort(key=lambda cand: -cand.score)
    return out[:k]
