"""Interaction datasets for offline training/evaluation: lfm2k (MMRec format) and MovieLens-100K."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fusionrec.core.paths import home, shared_path

TEXT_ENCODER = "minilm-l6-v2"


@dataclass
class InteractionData:
    """Implicit feedback split into train/valid/test plus per-item content vectors.

    Attributes:
        name: dataset name.
        n_users, n_items: dense id ranges.
        train, valid, test: (n, 2) int64 (user, item) rows; ``train`` rows are oldest first per user.
        features: modality -> (n_items, d_m) float32, row i = item i.
        encoder_versions: modality -> version of the encoder that made its vectors.
        split: how valid/test were cut (reported verbatim).
        held_out: item ids held out of training entirely (the cold-item protocol): not in the
            catalog while training, so no negatives and no say in any mean. Catalog items that
            merely lack train interactions are not held out: nobody chose them, which is signal.
        present: modality -> (n_items,) bool, items that have it (absent modality: every item);
            an absent item's row holds a filler the net masks out, as serving does.
    """

    name: str
    n_users: int
    n_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    features: dict[str, np.ndarray]
    encoder_versions: dict[str, str]
    split: str
    item_names: list[str] = field(default_factory=list)
    held_out: np.ndarray | None = None
    present: dict[str, np.ndarray] = field(default_factory=dict)
    _by_user: dict = field(default_factory=dict, repr=False, compare=False)

    def user_items(self, part: str = "train") -> list[np.ndarray]:
        """Per user, that split's item ids (train: in history order, oldest first); cached per array."""
        rows = getattr(self, part)
        key = (part, id(rows), len(rows))
        if key not in self._by_user:
            order = np.argsort(rows[:, 0], kind="stable")  # stable: keeps history order within a user
            bounds = np.searchsorted(rows[order, 0], np.arange(self.n_users + 1))
            items = rows[order, 1].astype(np.int64)
            self._by_user[key] = [items[bounds[u]:bounds[u + 1]] for u in range(self.n_users)]
        return self._by_user[key]

    def modality_dims(self) -> dict[str, int]:
        return {m: int(v.shape[1]) for m, v in self.features.items()}


def encode_text_cached(texts: list[str], cache_dir: Path, tag: str,
                       encode: Callable[[list[str]], np.ndarray] | None = None) -> tuple[np.ndarray, str]:
    """Run our text encoder over ``texts`` once; reuse the .npy keyed by encoder version + text hash.

    Returns:
        ((len(texts), 384) float32, encoder version).
    """
    from fusionrec.encoders.registry import encoder_class

    version = encoder_class(TEXT_ENCODER).version_for()  # default options, as get_encoder below
    digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]
    path = cache_dir / f"{tag}-text-{version.replace('@', '-')}-{digest}.npy"
    if path.exists():
        return np.load(path), version
    if encode is None:
        from fusionrec.encoders.registry import get_encoder

        encode = get_encoder(TEXT_ENCODER).encode
    vectors = np.asarray(encode(texts), dtype=np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written cache
    return vectors, version


def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:]  # drop header


def load_lfm2k(data_root: Path | None = None, cache_dir: Path | None = None) -> InteractionData:
    """Last.fm-2K artists with MMRec's split (x_label 0/1/2), text = tags through our encoder,
    audio = the shipped vggish/whisper vectors (bring-your-own path)."""
    root = Path(data_root) / "lfm2k" if data_root else shared_path("data", "lfm2k")
    inter = np.asarray([[int(c) for c in r[:4]] for r in _read_tsv(root / "lfm2k.inter")], dtype=np.int64)
    og = np.asarray([[int(c) for c in r[:4]] for r in _read_tsv(root / "lfm2k_og_ids.inter")], dtype=np.int64)
    if len(og) != len(inter) or not np.array_equal(og[:, 3], inter[:, 3]):
        raise ValueError("lfm2k_og_ids.inter does not align row by row with lfm2k.inter")
    n_users, n_items = int(inter[:, 0].max()) + 1, int(inter[:, 1].max()) + 1
    artist_of = np.full(n_items, -1, dtype=np.int64)
    artist_of[inter[:, 1]] = og[:, 1]
    tags = {int(r[0]): r[1] for r in _read_tsv(root / "lfm2k_text.tsv") if len(r) >= 2}
    missing = [int(i) for i in range(n_items) if int(artist_of[i]) not in tags]
    if missing:
        raise ValueError(f"lfm2k: {len(missing)} items have no tag text, e.g. item {missing[0]}")
    texts = [tags[int(a)].replace(",", ", ") for a in artist_of]
    text, text_version = encode_text_cached(texts, Path(cache_dir or home("cache")), "lfm2k")
    vggish = np.load(root / "vggish.npy").astype(np.float32)
    whisper = np.load(root / "whisper.npy").astype(np.float32)
    for name, arr in (("vggish", vggish), ("whisper", whisper)):
        if len(arr) != n_items:
            raise ValueError(f"lfm2k {name}.npy has {len(arr)} rows, expected {n_items}")
    by_split = [inter[inter[:, 3] == s][:, :2] for s in (0, 1, 2)]
    return InteractionData(
        name="lfm2k", n_users=n_users, n_items=n_items,
        train=by_split[0], valid=by_split[1], test=by_split[2],
        features={"text": text, "vggish": vggish, "whisper": whisper},
        encoder_versions={"text": text_version, "vggish": "vggish@lfm2k", "whisper": "whisper@lfm2k"},
        split="MMRec x_label split shipped with the data (0 train / 1 valid / 2 test)",
        item_names=[str(int(a)) for a in artist_of],
    )


def chronological_split(rows: np.ndarray, n_users: int, fractions: tuple[float, float] = (0.8, 0.9)
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user, sort (user, item, timestamp) rows by time and cut at 80 % / 90 %.

    Returns:
        train, valid, test: (n, 2) int64 (user, item), train oldest first per user.
    """
    parts: list[list[np.ndarray]] = [[], [], []]
    order = np.lexsort((np.arange(len(rows)), rows[:, 2], rows[:, 0]))  # user, then time, then file order
    rows = rows[order]
    starts = np.searchsorted(rows[:, 0], np.arange(n_users + 1))
    for u in range(n_users):
        r = rows[starts[u]:starts[u + 1], :2]
        a, b = int(round(len(r) * fractions[0])), int(round(len(r) * fractions[1]))
        for k, chunk in enumerate((r[:a], r[a:b], r[b:])):
            parts[k].append(chunk)
    return tuple(np.concatenate(p).astype(np.int64) for p in parts)  # type: ignore[return-value]


def load_ml100k(data_root: Path | None = None, cache_dir: Path | None = None) -> InteractionData:
    """MovieLens-100K, every rating as an implicit interaction, per-user chronological 80/10/10;
    text = "title (year). genres" through our encoder; no audio."""
    root = Path(data_root) / "ml-100k" if data_root else shared_path("data", "ml-100k")
    raw = np.asarray([[int(r[0]), int(r[1]), int(float(r[3]))] for r in _read_tsv(root / "ml-100k.inter")],
                     dtype=np.int64)
    items = {int(r[0]): r for r in _read_tsv(root / "ml-100k.item")}
    user_ids, users = np.unique(raw[:, 0], return_inverse=True)
    item_ids, item_idx = np.unique(raw[:, 1], return_inverse=True)
    rows = np.stack([users, item_idx, raw[:, 2]], axis=1)
    train, valid, test = chronological_split(rows, len(user_ids))
    texts = []
    for i in item_ids:
        r = items.get(int(i), [str(i), "unknown", "", ""])
        title, year, genres = (r + ["", "", ""])[1:4]
        texts.append(f"{title} ({year}). {genres.replace(' ', ', ')}".strip())
    text, text_version = encode_text_cached(texts, Path(cache_dir or home("cache")), "ml-100k")
    return InteractionData(
        name="ml-100k", n_users=len(user_ids), n_items=len(item_ids), train=train, valid=valid, test=test,
        features={"text": text}, encoder_versions={"text": text_version},
        split="per-user chronological 80/10/10 by timestamp (every rating = one interaction)",
        item_names=[str(int(i)) for i in item_ids],
    )


LOADERS: dict[str, Callable[..., InteractionData]] = {"lfm2k": load_lfm2k, "ml-100k": load_ml100k}


def load_dataset(name: str, data_root: Path | None = None, cache_dir: Path | None = None) -> InteractionData:
    """Load a dataset by name; unknown names fail loudly."""
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}") from None
    return loader(data_root, Path(cache_dir or home("cache")))
