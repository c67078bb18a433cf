"""Write trained nets as versioned checkpoints: weights, frozen graph residuals, cold-start neighbours, metrics."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import torch

from fusionrec.core.paths import home
from fusionrec.fusion.checkpoint import FORMAT_VERSION
from fusionrec.fusion.train.config import TrainConfig, VariantConfig
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.ensemble import EnsembleNet
from fusionrec.fusion.train.fusion_net import FusionNet


@torch.no_grad()
def _member_weights(net: FusionNet) -> dict[str, Any]:
    """One net's towers and its frozen graph smoothing: per known item, ``residual = propagated - own
    blocks`` (n_known, dim), so serving adds it to the item's content/id blocks and new items get none."""
    net.eval()
    known = net.known.nonzero().squeeze(1)
    own = net.item_blocks(train=False)
    residual = (net.propagate(own) - own).reshape(net.n_items, -1)[known] if net.graph is not None else None
    # New items borrow from the known items' served vectors (fusionrec.fusion.cold): keep them, rows as item_ids.
    warm = net.item_vectors(train=False)[0][known] if net.cold is not None else None
    return {"item_tower": net.item_tower.state_dict(), "user_tower": net.user_tower.state_dict(),
            "graph_residual": residual, "cold_neighbours": warm}


@torch.no_grad()
def export_payload(net: FusionNet | EnsembleNet, data: InteractionData, variant_name: str, variant: VariantConfig,
                   cfg: TrainConfig, seed: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything serving needs, as plain tensors/containers (loadable with ``weights_only=True``).

    An ensemble's members share the data, config and known items; each keeps its own weights.
    """
    members = list(net.members) if isinstance(net, EnsembleNet) else [net]
    first = members[0]
    known = first.known.nonzero().squeeze(1)
    mods = list(first.item_tower.modalities)
    return {
        "format_version": FORMAT_VERSION,
        "dataset": data.name,
        "variant": variant_name,
        "variant_config": variant.to_dict(),
        "train_config": cfg.to_dict(),
        "seed": seed,
        "modalities": {m: {"dim": int(data.features[m].shape[1]), "version": data.encoder_versions[m]}
                       for m in mods},
        "parts": list(first.item_tower.parts),
        "block_dim": cfg.block_dim,
        "normalize": bool(cfg.normalize),
        "hidden": cfg.hidden,
        "user_tower": cfg.user_tower,
        "item_ids": [str(int(i)) for i in known.tolist()],
        "id_rows": known.clone(),  # id-table row of each entry of item_ids
        "n_id_rows": first.n_items if first.item_tower.id_emb is not None else 0,
        "members": [_member_weights(m) for m in members],
        "cold_start": first.cold.to_payload() if first.cold is not None else None,
        "metrics": metrics,
    }


def save_checkpoint(payload: dict[str, Any], directory: Path | None = None) -> Path:
    """Write ``<dataset>-<variant>-<hash>.pt`` (+ ``.json`` metrics next to it) into ``directory`` (default
    ``$FUSIONREC_HOME/checkpoints``); returns the .pt path."""
    directory = Path(directory or home("checkpoints"))
    directory.mkdir(parents=True, exist_ok=True)
    # Straight to a temporary file, hashed as it is read back: a large catalog's checkpoint (hundreds of MB)
    # is never held in memory twice; the rename makes it appear whole.
    tmp = directory / f".{payload['dataset']}-{payload['variant']}-{uuid.uuid4().hex}.tmp"
    torch.save(payload, tmp)
    digest = hashlib.sha256()
    with open(tmp, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    path = directory / f"{payload['dataset']}-{payload['variant']}-{digest.hexdigest()[:12]}.pt"
    tmp.replace(path)
    meta = {k: payload[k] for k in ("dataset", "variant", "variant_config", "train_config", "seed", "modalities",
                                   "parts", "metrics")}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path
