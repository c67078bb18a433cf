"""The persisted StoreSchema: validation, JSON round trip, and what differs between two."""

from __future__ import annotations

import json
import re
from numbers import Integral

from fusionrec.retrieval.base import StoreSchema
from fusionrec.retrieval.layout import MODALITY_NAME_MAX, STORE_FORMAT, VERSION_MAX_BYTES
from fusionrec.core.rules import check_str

_MODALITY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,%d}" % (MODALITY_NAME_MAX - 1))


def schema_to_json(schema: StoreSchema) -> str:
    return json.dumps(
        {
            "format": STORE_FORMAT,
            "modality_dims": {k: int(v) for k, v in sorted(schema.modality_dims.items())},
            "fused_dim": int(schema.fused_dim),
            "encoder_versions": dict(sorted(schema.encoder_versions.items())),
            "model_version": schema.model_version,
            "extra": dict(sorted(schema.extra.items())),
        },
        sort_keys=True,
    )


def schema_from_json(text: str) -> StoreSchema:
    d = json.loads(text)
    return StoreSchema(
        modality_dims={k: int(v) for k, v in d["modality_dims"].items()},
        fused_dim=int(d["fused_dim"]),
        encoder_versions=dict(d["encoder_versions"]),
        model_version=d["model_version"],
        extra=dict(d.get("extra", {})),
    )


def modality_differences(stored: StoreSchema, configured: StoreSchema) -> list[str]:
    """Differences in the per-modality vectors (names, dims, encoder versions)."""
    diffs = []
    for m in sorted(set(stored.modality_dims) | set(configured.modality_dims)):
        if m not in configured.modality_dims:
            diffs.append(f"modality {m!r} is in the stored data but not configured")
            continue
        if m not in stored.modality_dims:
            diffs.append(f"modality {m!r} is configured but not in the stored data")
            continue
        if stored.modality_dims[m] != configured.modality_dims[m]:
            diffs.append(
                f"modality {m!r}: stored dim {stored.modality_dims[m]}, "
                f"configured dim {configured.modality_dims[m]}"
            )
        sv, cv = stored.encoder_versions.get(m), configured.encoder_versions.get(m)
        if sv != cv:
            diffs.append(f"modality {m!r}: stored encoder version {sv!r}, configured {cv!r}")
    return diffs


def schema_differences(stored: StoreSchema, configured: StoreSchema) -> list[str]:
    """Human-readable differences that make stored vectors unusable with ``configured``.

    ``extra`` is persisted for information but not compared.
    """
    diffs = modality_differences(stored, configured)
    if stored.fused_dim != configured.fused_dim:
        diffs.append(
            f"fused vectors: stored dim {stored.fused_dim}, configured {configured.fused_dim}"
        )
    if stored.model_version != configured.model_version:
        diffs.append(
            f"fusion model: stored model version {stored.model_version!r}, "
            f"configured {configured.model_version!r}"
        )
    return diffs


def validate_schema(schema: StoreSchema) -> None:
    """ValueError unless dims, modality names and version strings are storable."""
    if not isinstance(schema.fused_dim, Integral) or schema.fused_dim < 2:
        raise ValueError(f"fused_dim must be an int >= 2, got {schema.fused_dim!r}")
    for m, d in schema.modality_dims.items():
        if not isinstance(m, str) or _MODALITY_RE.fullmatch(m) is None:
            raise ValueError(f"invalid modality name {m!r}: must match ^[A-Za-z_][A-Za-z0-9_]*$")
        if not isinstance(d, Integral) or d < 2:
            raise ValueError(f"modality {m!r}: dim must be an int >= 2, got {d!r}")
    for m, v in schema.encoder_versions.items():
        if m not in schema.modality_dims:
            raise ValueError(f"encoder version given for unknown modality {m!r}")
        check_str(v, f"encoder version of {m!r}", VERSION_MAX_BYTES, allow_empty=True)
    check_str(schema.model_version, "model_version", VERSION_MAX_BYTES, allow_empty=True)
