"""Variants by name (what a net uses) and the shared training hyper-parameters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

#: Modality groups used by the ablations ("audio" = every precomputed audio feature and the platform's own
#: audio encoder's vectors).
MODALITY_GROUPS: dict[str, tuple[str, ...]] = {"text": ("text",), "audio": ("vggish", "whisper", "audio"),
                                               "image": ("image",)}


@dataclass
class VariantConfig:
    """What a variant uses; hyper-parameters live in ``TrainConfig``."""

    #: Net class by name (fusionrec.fusion.train.nets.NETS): "fusion" (two-tower, served) or "lightgcn"
    #: (per-user embeddings, baseline only).
    kind: str = "fusion"
    groups: tuple[str, ...] = ("text", "audio")  # content modality groups
    use_id: bool = True
    graph: bool = False
    #: Nets trained with different seeds and served as one (mean of their cosines; fusionrec.fusion.train.ensemble).
    members: int = 1
    #: TrainConfig fields this variant changes (e.g. LightGCN learns per-user tables: bigger batches, higher lr).
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS: dict[str, VariantConfig] = {
    "full": VariantConfig(groups=("text", "audio"), use_id=True, graph=True, members=4),
    "full-nograph": VariantConfig(groups=("text", "audio"), use_id=True, graph=False),
    "content": VariantConfig(groups=("text", "audio"), use_id=False, graph=False),
    "id": VariantConfig(groups=(), use_id=True, graph=True),
    "text": VariantConfig(groups=("text",), use_id=False, graph=False),
    "audio": VariantConfig(groups=("audio",), use_id=False, graph=False),
    "id+text": VariantConfig(groups=("text",), use_id=True, graph=True),
    "id+audio": VariantConfig(groups=("audio",), use_id=True, graph=True),
    "text+audio": VariantConfig(groups=("text", "audio"), use_id=False, graph=False),
    # One net per user tower kind (the tower comparison; fusionrec.fusion.towers.USER_TOWERS).
    "full-attention": VariantConfig(groups=("text", "audio"), use_id=True, graph=True,
                                    overrides={"user_tower": "attention"}),
    "full-gru": VariantConfig(groups=("text", "audio"), use_id=True, graph=True, overrides={"user_tower": "gru"}),
    "lightgcn": VariantConfig(kind="lightgcn", groups=(), use_id=True, graph=True,
                              overrides={"batch_users": 1024, "lr": 1e-2}),
}


def get_variant(name: str) -> VariantConfig:
    """The variant registered under ``name``; unknown names fail loudly, listing the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}") from None


@dataclass
class TrainConfig:
    """Hyper-parameters shared by every variant (fixed defaults; the CLI may override a few)."""

    block_dim: int = 64
    #: User tower by name (fusionrec.fusion.towers.USER_TOWERS): "attention" (pooling with a recency bias) or
    #: "gru" (the same plus a GRU over the ordered history).
    user_tower: str = "attention"
    hidden: int = 256
    epochs: int = 200
    patience: int = 10
    batch_users: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    keep_prob: float = 0.5  # share of a user's train history fed to the user tower at train time
    #: Share of users per batch split chronologically (the first >= keep_prob of the history in, the rest out)
    #: instead of at random: teaches a sequence-aware tower to predict what comes next.
    prefix_share: float = 0.0
    modality_dropout: float = 0.2
    id_dropout: float = 0.1
    align_weight: float = 0.1
    align_temperature: float = 0.2
    #: Weight of the cross-modal query loss (FusionNet.query_loss): 0 leaves the query path untrained.
    query_weight: float = 0.0
    temperature: float = 0.15
    normalize: bool = True  # unit item/user vectors (cosine / temperature) instead of raw inner products
    graph_layers: int = 4
    graph_alpha: float = 1.0
    cooc_k: int = 20
    content_k: int = 10
    content_graph_weight: float = 0.3
    cold_k: int = 10  # warm content neighbours an item without interactions borrows from (fusionrec.fusion.cold)
    cold_share: float = 0.5  # share of its vector taken from them; 0 = content blocks only
    eval_every: int = 1
    #: Items a training batch scores besides its own (history and targets): a uniform catalog sample shared by
    #: the batch (sampled softmax; fusionrec.fusion.train.sampling). A catalog of at most this many items is
    #: scored whole (exact softmax, exact graph gradients); above it a batch costs O(batch + negatives).
    negatives: int = 4096
    #: Users that train()'s per-epoch validation and final test rank (a fixed random sample per run); 0 = all.
    eval_users: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def train_config(variant: VariantConfig, **overrides) -> "TrainConfig":
    """Shared defaults, then the variant's own overrides, then the caller's."""
    return TrainConfig(**{**variant.overrides, **overrides})


def variant_modalities(variant: VariantConfig, available: dict[str, int]) -> dict[str, int]:
    """The dataset's modalities this variant uses, in a stable order."""
    wanted = [m for g in variant.groups for m in MODALITY_GROUPS.get(g, (g,))]
    return {m: available[m] for m in wanted if m in available}
