"""The stored Milvus layout in one place: collection/field names, sizes, index and search params.

- ``<items>``: ``id`` VARCHAR(256) pk, ``fused`` FLOAT_VECTOR(fused_dim) (IP; FLAT on
  Lite, HNSW on a server), ``model_version`` VARCHAR, attributes as dynamic keys
  ``attr_<name>``. Collection properties hold the StoreSchema (JSON). The only collection
  a Milvus-side search touches, kept lean on purpose: with the modality vectors beside it,
  every filter that falls back to row-wise evaluation in Lite pays for them.
- ``<items>_modality_vectors``: ``id`` pk, one ``vec_<modality>`` FLOAT_VECTOR per
  modality (zeros when absent; FLAT/IP), ``modalities`` ARRAY<VARCHAR> (which ones the
  item has), ``versions`` JSON (modality -> encoder version), ``content`` JSON (modality ->
  sha256 of the kept raw content; absent in stores created before content retention). Written before the item row,
  deleted after it. Its properties also record which items collection is active
  (``PROP_ACTIVE_ITEMS``) once the store has been re-indexed (Lite has no aliases).
- ``<interactions>``: ``pk`` INT64 auto-id, ``user_id``, ``item_id``, ``kind`` VARCHAR,
  ``ts`` DOUBLE, ``dummy_vec`` FLOAT_VECTOR(2) (Milvus needs one vector field): events without an id.
- ``<interactions>_keyed``: events with an idempotency key. ``id`` VARCHAR pk = sha256 of
  (user id, event id), so writing an event again replaces it instead of adding one; ``seq`` INT64
  (write order, breaks timestamp ties like ``pk`` above), ``event_id`` and the fields above.

On a Milvus server (2.3 allows one vector field per collection; retrieval/server_items.py):

- ``<items>`` is an ALIAS of the live items collection ``<items>__r<n>`` (same fields as above); a
  re-index builds ``__r<n+1>`` and moves the alias, so every replica switches at once.
- ``<items>_vec_<modality>``: ``id`` pk, ``vec`` FLOAT_VECTOR(dim), ``version`` (encoder) and
  ``content`` (sha256 of the kept content, or "") VARCHAR; a row only where the item has the modality.
- ``<items>_state``: ``id`` pk + a 2-d dummy vector, never written; its properties mark the layout
  and list replaced items collections awaiting their drop (``PROP_RETIRED``).
- ``<items>_lock``: exists while a re-index or encoder-swap commit runs (retrieval/server_lock.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fusionrec.core.rules import EVENT_ID_MAX_BYTES, ID_MAX_BYTES, KIND_MAX_BYTES, VERSION_MAX_BYTES

STORE_FORMAT = "1"
PROP_SCHEMA = "fusionrec.store_schema"  # items collection: StoreSchema as JSON
PROP_FORMAT = "fusionrec.format"
PROP_ROLE = "fusionrec.role"  # "items" | "modality_vectors" | "interactions"
PROP_ACTIVE_ITEMS = "fusionrec.active_items"  # modality-vectors collection: live items collection

F_ID = "id"
F_FUSED = "fused"
F_MODEL_VERSION = "model_version"
ATTR_PREFIX = "attr_"  # attribute "genre" is stored as dynamic key "attr_genre"

MVEC_SUFFIX = "_modality_vectors"
VEC_PREFIX = "vec_"
F_MODALITIES = "modalities"
F_VERSIONS = "versions"
F_CONTENT = "content"  # may be missing from stores created before content retention
F_MVEC_DUMMY = "dummy_vec"  # only when the schema has no modality at all

F_PK = "pk"
F_USER = "user_id"
F_ITEM = "item_id"
F_KIND = "kind"
F_TS = "ts"
F_DUMMY = "dummy_vec"
DUMMY_DIM = 2
KEYED_SUFFIX = "_keyed"  # <interactions>_keyed: events with an event id
F_SEQ = "seq"
F_EVENT_ID = "event_id"
EVENT_KEY_MAX = 64  # sha256 hex of (user id, event id)

MODALITY_NAME_MAX = 64

# Milvus server layout (see the module docstring)
SERVER_LAYOUT = "server-1"
PROP_LAYOUT = "fusionrec.layout"
PROP_RETIRED = "fusionrec.retired"  # state collection: [[collection, retired_at_s], ...]
MODALITY_SUFFIX = "_vec_"
STATE_SUFFIX = "_state"
LOCK_SUFFIX = "_lock"
F_VEC = "vec"
F_VERSION = "version"
DIGEST_MAX = 64

MILVUS_MAX_TOPK = 16384
QUERY_CHUNK = 1000  # ids per `id in [...]` query
MAX_WRITE_BYTES = 16 << 20  # per upsert/insert call (gRPC limit is 64 MiB)
FLUSH_EVERY_ROWS_LITE = 512  # Lite serves searches: they scan unflushed rows in Python
FLUSH_EVERY_ROWS_LITE_MIRRORED = 8192  # searches go to the in-memory index; flushes cost the write path

# index params per backend and field role: exact search on Lite (its ANN indexes are no
# faster there and lose filtered recall, see DESIGN); HNSW for the fused vectors on a server.
INDEX_PARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "lite": {
        "fused": {"index_type": "FLAT", "metric_type": "IP", "params": {}},
        "modality": {"index_type": "FLAT", "metric_type": "IP", "params": {}},
        "dummy": {"index_type": "FLAT", "metric_type": "L2", "params": {}},
    },
    "server": {
        "fused": {"index_type": "HNSW", "metric_type": "IP", "params": {"M": 16, "efConstruction": 200}},
        "modality": {"index_type": "FLAT", "metric_type": "IP", "params": {}},
        "dummy": {"index_type": "FLAT", "metric_type": "L2", "params": {}},
    },
}
HNSW_MIN_EF = 128


def search_params(backend: str, k: int) -> dict[str, Any]:
    """Milvus search params for the fused field on ``backend`` ("lite" | "server")."""
    if backend == "server":
        return {"metric_type": "IP", "params": {"ef": max(HNSW_MIN_EF, k)}}
    return {"metric_type": "IP", "params": {}}


def items_schema(fused_dim: int):
    """(schema, [(vector field, index role)]) of an items collection."""
    from pymilvus import DataType, MilvusClient

    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    s.add_field(F_ID, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    s.add_field(F_FUSED, DataType.FLOAT_VECTOR, dim=int(fused_dim))
    s.add_field(F_MODEL_VERSION, DataType.VARCHAR, max_length=VERSION_MAX_BYTES)
    return s, [(F_FUSED, "fused")]


def modality_vectors_schema(modality_dims: dict[str, int]):
    """(schema, [(vector field, index role)]) of a modality-vectors collection."""
    from pymilvus import DataType, MilvusClient

    modalities = sorted(modality_dims)
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field(F_ID, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    idx = []
    for m in modalities:
        s.add_field(VEC_PREFIX + m, DataType.FLOAT_VECTOR, dim=int(modality_dims[m]))
        idx.append((VEC_PREFIX + m, "modality"))
    if not modalities:
        s.add_field(F_MVEC_DUMMY, DataType.FLOAT_VECTOR, dim=DUMMY_DIM)
        idx.append((F_MVEC_DUMMY, "dummy"))
    s.add_field(
        F_MODALITIES,
        DataType.ARRAY,
        element_type=DataType.VARCHAR,
        max_capacity=max(1, len(modalities)),
        max_length=MODALITY_NAME_MAX,
    )
    s.add_field(F_VERSIONS, DataType.JSON)
    s.add_field(F_CONTENT, DataType.JSON)
    return s, idx


def modality_schema(dim: int):
    """(schema, [(vector field, index role)]) of one modality's collection on a server."""
    from pymilvus import DataType, MilvusClient

    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field(F_ID, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    s.add_field(F_VEC, DataType.FLOAT_VECTOR, dim=int(dim))
    s.add_field(F_VERSION, DataType.VARCHAR, max_length=VERSION_MAX_BYTES)
    s.add_field(F_CONTENT, DataType.VARCHAR, max_length=DIGEST_MAX)
    return s, [(F_VEC, "modality")]


def marker_schema():
    """(schema, [(vector field, index role)]) of the state and lock collections (never written)."""
    from pymilvus import DataType, MilvusClient

    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field(F_ID, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    s.add_field(F_DUMMY, DataType.FLOAT_VECTOR, dim=DUMMY_DIM)
    return s, [(F_DUMMY, "dummy")]


def interactions_schema():
    """(schema, [(vector field, index role)]) of an interactions collection."""
    from pymilvus import DataType, MilvusClient

    s = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
    s.add_field(F_PK, DataType.INT64, is_primary=True)
    s.add_field(F_USER, DataType.VARCHAR, max_length=ID_MAX_BYTES)
    s.add_field(F_ITEM, DataType.VARCHAR, max_length=ID_MAX_BYTES)
    s.add_field(F_KIND, DataType.VARCHAR, max_length=KIND_MAX_BYTES)
    s.add_field(F_TS, DataType.DOUBLE)
    s.add_field(F_DUMMY, DataType.FLOAT_VECTOR, dim=DUMMY_DIM)
    return s, [(F_DUMMY, "dummy")]


def keyed_interactions_schema():
    """(schema, [(vector field, index role)]) of the collection of events with an idempotency key."""
    from pymilvus import DataType, MilvusClient

    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field(F_ID, DataType.VARCHAR, is_primary=True, max_length=EVENT_KEY_MAX)
    s.add_field(F_SEQ, DataType.INT64)
    s.add_field(F_USER, DataType.VARCHAR, max_length=ID_MAX_BYTES)
    s.add_field(F_ITEM, DataType.VARCHAR, max_length=ID_MAX_BYTES)
    s.add_field(F_KIND, DataType.VARCHAR, max_length=KIND_MAX_BYTES)
    s.add_field(F_TS, DataType.DOUBLE)
    s.add_field(F_EVENT_ID, DataType.VARCHAR, max_length=EVENT_ID_MAX_BYTES)
    s.add_field(F_DUMMY, DataType.FLOAT_VECTOR, dim=DUMMY_DIM)
    return s, [(F_DUMMY, "dummy")]


def vec_out(value: Any) -> np.ndarray:
    """A vector field as Milvus returns it -> (dim,) float32."""
    return np.asarray(value, dtype=np.float32).reshape(-1)
