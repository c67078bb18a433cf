"""Opening the items collections: create them on first use, else check they hold what is configured.

A store is refused (SchemaMismatch, with advice) when its collections were written with other
encoders, another fusion model or another layout than configured: mixing them would silently
return wrong neighbours.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

from fusionrec.retrieval.base import SchemaMismatch, StoreSchema
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.layout import (
    F_FUSED,
    KEYED_SUFFIX,
    LOCK_SUFFIX,
    MODALITY_SUFFIX,
    MVEC_SUFFIX,
    PROP_ACTIVE_ITEMS,
    PROP_FORMAT,
    PROP_ROLE,
    PROP_SCHEMA,
    STATE_SUFFIX,
    STORE_FORMAT,
    VEC_PREFIX,
    items_schema,
    modality_vectors_schema,
)
from fusionrec.retrieval.shadow import SHADOW_INFIX
from fusionrec.retrieval.schema_meta import modality_differences, schema_differences, schema_from_json, schema_to_json

logger = logging.getLogger(__name__)

_COLLECTION_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
REINDEX_SEP = "__r"  # re-indexed items collections are named <items>__r<n>


@dataclass(frozen=True)
class CollectionNames:
    """The configured collection names; ``mvec`` holds the items' per-modality vectors."""

    items: str
    interactions: str

    @property
    def mvec(self) -> str:
        return self.items + MVEC_SUFFIX

    def check(self) -> "CollectionNames":
        """Raise ValueError for names Milvus refuses or that would collide; returns self."""
        for name in (self.items, self.interactions):
            if not isinstance(name, str) or _COLLECTION_RE.fullmatch(name) is None:
                raise ValueError(f"invalid collection name {name!r}")
        if self.items == self.interactions:
            raise ValueError("items and interactions collections must differ")
        if REINDEX_SEP in self.items:
            raise ValueError(f"items collection name must not contain {REINDEX_SEP!r}")
        own = (self.items, self.mvec, self.items + STATE_SUFFIX, self.items + LOCK_SUFFIX)
        for name in (self.interactions, self.interactions + KEYED_SUFFIX):  # the interactions' own collections
            if name in own or name.startswith((self.items + MODALITY_SUFFIX, self.items + SHADOW_INFIX)):
                raise ValueError(f"collection name {name!r} is reserved for the items' own collections")
        return self


def items_properties(schema: StoreSchema) -> dict[str, str]:
    """Properties of an items collection: the StoreSchema its vectors were written with."""
    return {PROP_FORMAT: STORE_FORMAT, PROP_ROLE: "items", PROP_SCHEMA: schema_to_json(schema)}


def open_items(conn: MilvusConnection, names: CollectionNames, schema: StoreSchema,
               accept_stored_model: bool = False) -> tuple[str, StoreSchema]:
    """Create or check the items and modality-vectors collections, then load them.

    Args:
        accept_stored_model: when only the fused space (model version / fused dim) differs
            from ``schema``, open with the stored one instead of raising, so the caller can
            re-index.
    Returns:
        (the items collection now active (see reindex), the schema the stored data has).
    """
    c = conn.client
    active = active_items(conn, names)
    if c.has_collection(active):
        schema = _check_items(conn, names, active, schema, accept_stored_model)
    else:
        active = _create_items(conn, names, active, schema)
    c.load_collection(names.mvec)
    c.load_collection(active)
    return active, schema


def active_items(conn: MilvusConnection, names: CollectionNames) -> str:
    """The items collection named in the modality-vectors properties, else the configured one."""
    c = conn.client
    if c.has_collection(names.mvec):
        props = c.describe_collection(names.mvec).get("properties") or {}
        return props.get(PROP_ACTIVE_ITEMS) or names.items
    return names.items


def has_field(conn: MilvusConnection, collection: str, field_name: str) -> bool:
    """Whether ``collection`` has a field ``field_name`` (older stores lack newer fields)."""
    return any(f.get("name") == field_name for f in conn.client.describe_collection(collection).get("fields", []))


def _create_items(conn: MilvusConnection, names: CollectionNames, active: str, schema: StoreSchema) -> str:
    c = conn.client
    if c.has_collection(names.mvec):
        logger.warning("dropping orphaned collection %r (its items collection %r is missing)", names.mvec, active)
        c.drop_collection(names.mvec)
        active = names.items
    # modality vectors first: the items collection (holding the schema) commits it.
    conn.create(names.mvec, modality_vectors_schema(schema.modality_dims),
                {PROP_FORMAT: STORE_FORMAT, PROP_ROLE: "modality_vectors"})
    conn.create(active, items_schema(schema.fused_dim), items_properties(schema))
    return active


def stored_schema(conn: MilvusConnection, name: str, desc: dict) -> StoreSchema:
    props = desc.get("properties") or {}
    raw = props.get(PROP_SCHEMA)
    if raw is None or props.get(PROP_ROLE) != "items":
        raise SchemaMismatch(
            f"Milvus collection '{name}' at {conn.where} exists but "
            f"is not a fusionrec items collection (no '{PROP_SCHEMA}' property). "
            f"Use another items_collection name, or drop that collection."
        )
    try:
        return schema_from_json(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise SchemaMismatch(
            f"Milvus collection '{name}' at {conn.where} has an "
            f"unreadable stored schema ({e}). Use another items_collection name or "
            f"drop and re-ingest."
        ) from e


def reconcile_schema(conn: MilvusConnection, names: CollectionNames, collection: str, stored: StoreSchema,
                     schema: StoreSchema, accept_stored_model: bool, called: str = "") -> StoreSchema:
    """``schema`` as the store will be opened with, given what ``collection`` holds (``stored``): with
    ``accept_stored_model``, a fused space that alone differs is taken as stored (the owner re-indexes,
    see reindex); any other difference raises SchemaMismatch with advice. ``called``: how callers name
    the collection (an alias), for the message."""
    if accept_stored_model and not modality_differences(stored, schema):
        schema = replace(schema, fused_dim=stored.fused_dim, model_version=stored.model_version)
    diffs = schema_differences(stored, schema)
    if diffs:
        raise SchemaMismatch(
            f"Milvus collection '{collection}'{called} at {conn.where} holds vectors written with another "
            "encoder/model configuration than this one:\n" + "".join(f"  - {d}\n" for d in diffs)
            + mismatch_advice(names, collection, bool(modality_differences(stored, schema))))
    return schema


def _check_items(conn: MilvusConnection, names: CollectionNames, active: str, schema: StoreSchema,
                 accept_stored_model: bool) -> StoreSchema:
    c = conn.client
    desc = c.describe_collection(active)
    schema = reconcile_schema(conn, names, active, stored_schema(conn, active, desc), schema, accept_stored_model)
    if not c.has_collection(names.mvec):
        raise SchemaMismatch(
            f"Milvus collection '{names.mvec}' (per-modality vectors of "
            f"'{active}') is missing at {conn.where}: the store is "
            f"incomplete. Drop '{active}' and re-ingest."
        )
    _check_fields(conn, names, active, active, desc, {F_FUSED: schema.fused_dim})
    _check_fields(conn, names, active, names.mvec, c.describe_collection(names.mvec),
                  {VEC_PREFIX + m: d for m, d in schema.modality_dims.items()})
    return schema


def _check_fields(conn: MilvusConnection, names: CollectionNames, active: str, name: str, desc: dict,
                  expected_dims: dict[str, int]) -> None:
    dims = {}
    for f in desc.get("fields", []):
        params = f.get("params") or {}
        if "dim" in params:
            dims[f["name"]] = int(params["dim"])
    for field_name, dim in expected_dims.items():
        if dims.get(field_name) != int(dim):
            raise SchemaMismatch(
                f"Milvus collection '{name}' at {conn.where}: vector field "
                f"'{field_name}' has dim {dims.get(field_name)}, configured {dim}. "
                + mismatch_advice(names, active)
            )


def mismatch_advice(names: CollectionNames, active: str, diffs_modalities: bool = True) -> str:
    """What to do about a store written with another configuration."""
    reindex = (
        ""
        if diffs_modalities
        else " Only the fusion model differs: re-index the fused vectors from the stored "
        "modality vectors with MilvusStore.reindex (opened with the stored configuration)."
    )
    return (
        f"Mixing them would silently return wrong neighbours. Either open the store with "
        f"another items collection name (e.g. items_collection="
        f"'{names.items}_v2') and re-ingest the catalog with the configured "
        f"encoders/model, or drop collections '{active}' and "
        f"'{names.mvec}' and re-ingest; to keep serving the stored data, "
        f"configure the stored versions instead.{reindex}"
    )
