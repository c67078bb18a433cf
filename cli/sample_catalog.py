"""Deterministic demo catalog: items whose image, text and audio share latent attributes, plus user histories."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from PIL import Image, ImageEnhance, ImageStat
from scipy.signal import lfilter

FORMAT_VERSION = 2  # bump when the generator's output changes, so cached catalogs are rebuilt
SAMPLE_RATE = 22050
CLIP_S = 2.0
MAX_SIDE = 320
EPOCH_S = 1_704_067_200.0  # 2024-01-01T00:00:00Z: fixed, so timestamps never depend on the wall clock
PREFERRED_SHARE = 0.85
#: Item appeal ~ 1 / rank^s within the catalog (rank from a seeded shuffle); 0 = every item alike.
POPULARITY_EXPONENT = 1.0
MOODS = ("calm", "upbeat", "dark")
KINDS, KIND_P = ("view", "like", "play"), (0.6, 0.15, 0.25)

# name -> (photo, subjects, settings, semitones above A2, [(partial ratio, amp)], noise level, noise lowpass)
CATEGORIES: dict[str, tuple] = {
    "cat": ("chelsea.png", ["a tabby cat", "a striped house cat", "a curious kitten", "a ginger cat", "a whiskered feline"],
            ["lounging", "staring into the lens", "resting on a windowsill", "curled up indoors", "watching quietly"],
            0, [(1, 1.0), (2, 0.5), (3, 0.3), (4, 0.2), (5, 0.1)], 0.02, 0.5),
    "coffee": ("coffee.png", ["a cup of espresso", "a latte in a white cup", "a fresh coffee", "a steaming cappuccino", "a morning brew"],
               ["on a saucer", "on a cafe table", "with creamy foam", "ready to drink", "at breakfast"],
               3, [(1, 1.0), (3, 0.45), (5, 0.25), (7, 0.12)], 0.03, 0.95),
    "rocket": ("rocket.jpg", ["a rocket", "a launch vehicle", "a space rocket", "a tall booster", "a missile on the pad"],
               ["on the launch pad", "awaiting liftoff", "against the sky", "at the launch site", "before countdown"],
               6, [(k, 0.8 / k) for k in range(1, 9)], 0.25, 0.2),
    "flower": ("flower.jpg", ["a blooming flower", "a bright blossom", "a garden flower", "a close-up petal", "a wild bloom"],
               ["in full bloom", "with a busy bee", "in the garden", "in spring light", "covered in pollen"],
               21, [(1, 1.0), (2, 0.08)], 0.01, 0.0),
    "horse": ("horse.png", ["a horse", "a galloping stallion", "a young mare", "a chestnut horse", "a pony"],
              ["in mid-stride", "running free", "on a white field", "kicking up its hooves", "in motion"],
              9, [(1, 1.0), (2, 0.6), (4, 0.4), (6, 0.2)], 0.08, 0.7),
    "astronaut": ("astronaut.png", ["an astronaut", "a spacewalker", "a space explorer", "a NASA astronaut", "a crew member in a spacesuit"],
                  ["posing with a flag", "in a spacesuit", "before a mission", "in an official portrait", "ready for launch"],
                  12, [(1, 1.0), (4, 0.5), (7, 0.3)], 0.04, 0.0),
    "motorcycle": ("motorcycle_left.png", ["a motorcycle", "a racing motorbike", "a sport bike", "a red motorbike", "a two-wheeler"],
                   ["in the garage", "parked in a showroom", "ready to ride", "built for speed", "with a polished frame"],
                   15, [(1, 1.0), (1.5, 0.6), (2, 0.5), (3, 0.4)], 0.15, 0.85),
    "temple": ("china.jpg", ["an old temple", "a Chinese pagoda", "a traditional temple", "a hillside shrine", "an ancient palace"],
               ["among green trees", "under a clear sky", "in a quiet landscape", "on a scenic hill", "framed by mountains"],
               18, [(1, 1.0), (2.76, 0.5), (5.4, 0.3), (8.93, 0.15)], 0.02, 0.3),
}
MOOD_WORDS = {"calm": ["calm", "serene", "peaceful", "gentle", "tranquil"],
              "upbeat": ["upbeat", "cheerful", "lively", "bright", "joyful"],
              "dark": ["dark", "moody", "brooding", "somber", "shadowy"]}
# mood -> brightness, [(colour word, RGB)]: the tint the image gets is the colour the text names
MOOD_TINTS = {"calm": (1.0, [("soft blue", (120, 160, 220)), ("pale green", (150, 200, 160)), ("misty lavender", (190, 170, 220))]),
              "upbeat": (1.12, [("warm orange", (255, 150, 60)), ("golden yellow", (255, 210, 80)), ("bright pink", (255, 120, 170))]),
              "dark": (0.62, [("deep purple", (80, 30, 100)), ("cold grey", (90, 95, 105)), ("midnight blue", (20, 30, 90))])}
SHOTS = ["snapshot", "photo", "picture", "shot", "still", "image", "view"]
TEMPLATES = ["{A} {adj} {shot} of {subj} {act}, {tint} tones.",
             "{Subj} {act}, captured in a {adj} {shot} with {tint} tones.",
             "{A} {adj}, {tint}-tinted {shot}: {subj} {act}."]


@dataclass(frozen=True)
class CatalogFiles:
    catalog_path: Path
    interactions_path: Path
    n_items: int
    n_users: int


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    # One independent stream per (purpose, item/user): an item's content never depends on generation order.
    return np.random.default_rng([seed, stream, index])


def _article(word: str) -> str:
    return "An" if word[0].lower() in "aeiou" else "A"


def _load_photos(media_dir: Path) -> dict[str, Image.Image]:
    photos = {}
    for name, (photo, *_) in CATEGORIES.items():
        path = media_dir / "images" / photo
        if not path.is_file():
            raise FileNotFoundError(f"sample photo for category {name!r} is missing: {path}")
        img = Image.open(path)
        if img.mode in ("RGBA", "LA", "P"):  # horse.png has alpha: flatten on white so tints behave
            img = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
        photos[name] = img.convert("RGB")
    return photos


def _make_image(base: Image.Image, mood: str, tint_rgb: tuple, rng: np.random.Generator) -> Image.Image:
    w, h = base.size
    area, aspect = rng.uniform(0.6, 1.0), np.exp(rng.uniform(-0.2, 0.2))
    cw, ch = min(w, round(w * np.sqrt(area * aspect))), min(h, round(h * np.sqrt(area / aspect)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = base.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)  # shrink first: rotating full size is 4x slower
    fill = tuple(int(c) for c in ImageStat.Stat(img).mean)  # corners get the mean colour, not black
    img = img.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BICUBIC, fillcolor=fill)
    brightness = MOOD_TINTS[mood][0] * rng.uniform(0.95, 1.05)
    img = ImageEnhance.Brightness(img).enhance(brightness)
    return Image.blend(img, Image.new("RGB", img.size, tint_rgb), float(rng.uniform(0.18, 0.3)))


def _make_text(category: str, mood: str, tint_word: str, rng: np.random.Generator, taken: set[str]) -> str:
    _, subjects, settings, *_ = CATEGORIES[category]
    for _ in range(50):  # redraw until unused, so items of one category read differently
        subj, act = str(rng.choice(subjects)), str(rng.choice(settings))
        adj, shot = str(rng.choice(MOOD_WORDS[mood])), str(rng.choice(SHOTS))
        text = str(rng.choice(TEMPLATES)).format(A=_article(adj), adj=adj, shot=shot, subj=subj, act=act,
                                                  Subj=subj[0].upper() + subj[1:], tint=tint_word)
        if text not in taken:
            break
    taken.add(text)
    return text


def _make_audio(category: str, mood: str, rng: np.random.Generator) -> np.ndarray:
    _, _, _, semitones, partials, noise_level, lowpass = CATEGORIES[category]
    t = np.arange(int(SAMPLE_RATE * CLIP_S)) / SAMPLE_RATE
    f0 = 110.0 * 2 ** (semitones / 12) * (1 + rng.uniform(-0.015, 0.015))  # category pitch + small jitter
    tone = sum(amp * np.sin(2 * np.pi * ratio * f0 * t + rng.uniform(0, 2 * np.pi)) for ratio, amp in partials)
    tone /= sum(amp for _, amp in partials)
    noise = lfilter([1 - lowpass], [1, -lowpass], rng.standard_normal(t.size))  # category noise colour
    noise /= np.abs(noise).max() + 1e-9
    sound = tone + noise_level * noise
    if mood == "calm":  # slow soft swells
        env = 0.35 * (0.55 - 0.45 * np.cos(2 * np.pi * 0.5 * t))
    elif mood == "upbeat":  # fast percussive pulses
        rate = 6.0 * rng.uniform(0.95, 1.05)
        env = 0.8 * np.exp(-25 * np.mod(t, 1 / rate))
    else:  # slow heavy pulses over a low rumble
        env = 0.55 * np.exp(-4 * np.mod(t, 1 / 1.5))
        rumble = lfilter([0.02], [1, -0.98], rng.standard_normal(t.size))
        sound = sound + 0.6 * rumble / (np.abs(rumble).max() + 1e-9) + 0.4 * np.sin(2 * np.pi * 45 * t)
    audio = env * sound + 0.005 * rng.standard_normal(t.size)  # a little per-item noise
    fade = np.minimum(1.0, np.minimum(t, CLIP_S - t) / 0.01)  # 10 ms fades: no clicks at the edges
    audio *= fade
    return (0.9 * audio / (np.abs(audio).max() + 1e-9)).astype(np.float32)


def _items(n_items: int, seed: int) -> list[dict]:
    rng = _rng(seed, 0)
    names = list(CATEGORIES)
    cats = rng.permutation(np.arange(n_items) % len(names))  # balanced spread, shuffled order
    items = []
    for i, c in enumerate(cats):
        mood = MOODS[int(rng.integers(len(MOODS)))]
        items.append({"id": f"item-{i + 1:04d}", "category": names[int(c)], "mood": mood,
                      "year": int(rng.integers(1990, 2026)),
                      "price": round(float(np.exp(rng.normal(2.3 + 0.15 * int(c), 0.5))), 2),
                      "explicit": bool(rng.random() < (0.25 if mood == "dark" else 0.05))})
    return items


def _appeal(n_items: int, seed: int) -> np.ndarray:
    """Per-item appeal (n,), Zipf-like over a seeded shuffle: as in real catalogs, a few items of every
    category draw most of its interactions. Content cannot tell which; only behaviour can."""
    rank = _rng(seed, 3).permutation(n_items) + 1
    return 1.0 / rank.astype(np.float64) ** POPULARITY_EXPONENT


def _pick(pool: list[str], seen: set[str], appeal: dict[str, float], rng: np.random.Generator) -> str:
    fresh = [i for i in pool if i not in seen] or pool  # replays only once the pool is used up
    weights = np.array([appeal[i] for i in fresh])
    return str(fresh[int(rng.choice(len(fresh), p=weights / weights.sum()))])


def _interactions(items: list[dict], n_users: int, seed: int) -> list[dict]:
    names = list(CATEGORIES)
    appeal = dict(zip((it["id"] for it in items), _appeal(len(items), seed)))
    rows = []
    for u in range(n_users):
        rng = _rng(seed, 2, u)
        prefs = {names[int(k)] for k in rng.choice(len(names), size=int(rng.integers(1, 3)), replace=False)}
        mood = MOODS[int(rng.integers(len(MOODS)))] if rng.random() < 0.5 else None
        liked = [it["id"] for it in items if it["category"] in prefs]
        liked_mood = [it["id"] for it in items if it["category"] in prefs and it["mood"] == mood]
        other = [it["id"] for it in items if it["category"] not in prefs] or liked
        ts, seen = EPOCH_S + rng.uniform(0, 30 * 86400), set()
        for _ in range(int(rng.integers(8, 21))):
            if rng.random() < PREFERRED_SHARE and liked:
                pool = liked_mood if liked_mood and rng.random() < 0.7 else liked
            else:
                pool = other
            item_id = _pick(pool, seen, appeal, rng)
            seen.add(item_id)
            ts += 5.0 + rng.exponential(1800.0)
            rows.append({"user_id": f"user-{u + 1:03d}", "item_id": item_id,
                         "kind": KINDS[int(rng.choice(len(KINDS), p=KIND_P))], "timestamp_s": round(ts, 3)})
    return rows


def _readme(n_items: int, n_users: int, seed: int) -> str:
    return (f"fusionrec sample catalog: {n_items} items, {n_users} users, seed {seed} "
            f"(cli/sample_catalog.py, format {FORMAT_VERSION}).\n\n"
            "Deterministic: same arguments -> byte-identical files; no wall clock is used.\n"
            "Each item has latent attributes: category (8, one base photo each), mood (calm/upbeat/dark),\n"
            "year, price and an explicit flag. All three modalities derive from them:\n"
            "- image: the category's photo, randomly cropped/flipped/rotated, mood-dependent brightness and tint;\n"
            "- text: category vocabulary + mood adjective + the tint's colour word;\n"
            "- audio: category pitch and timbre (partials, noise colour), mood rhythm (calm swells,\n"
            "  upbeat pulses, dark rumble + slow pulses), small per-item jitter and noise.\n"
            f"Users prefer 1-2 categories (half of them also a mood); ~{PREFERRED_SHARE:.0%} of each history "
            "comes from the preferred categories.\n"
            f"Within a pool, items are picked by appeal ~ 1/rank^{POPULARITY_EXPONENT} (a seeded shuffle of the "
            "catalog): a few items draw most interactions, which only behaviour reveals.\n")


def generate_catalog(out_dir: Path, media_dir: Path, n_items: int = 240, n_users: int = 40, seed: int = 7,
                     progress: Callable[[int], None] | None = None) -> CatalogFiles:
    """Write catalog.jsonl, interactions.jsonl, media/ and README.txt under out_dir (cached by manifest.json).

    progress(k) is told that k more items are ready (tqdm's `update`): 1 per generated item, or n_items at once
    when the existing files are reused.
    """
    out_dir, media_dir = Path(out_dir), Path(media_dir)
    files = CatalogFiles(out_dir / "catalog.jsonl", out_dir / "interactions.jsonl", n_items, n_users)
    args = {"format": FORMAT_VERSION, "n_items": n_items, "n_users": n_users, "seed": seed}
    manifest = out_dir / "manifest.json"
    if manifest.is_file() and files.catalog_path.is_file() and files.interactions_path.is_file():
        try:
            if json.loads(manifest.read_text()) == args:
                if progress:
                    progress(n_items)
                return files
        except ValueError:
            pass  # a damaged manifest just means: regenerate
    manifest.unlink(missing_ok=True)  # written last: a half-finished run is never taken for a complete one

    photos = _load_photos(media_dir)
    (out_dir / "media").mkdir(parents=True, exist_ok=True)
    items, taken = _items(n_items, seed), set()
    with open(files.catalog_path, "w") as fh:
        for i, it in enumerate(items):
            rng = _rng(seed, 1, i)
            tint_word, tint_rgb = MOOD_TINTS[it["mood"]][1][int(rng.integers(3))]
            img = _make_image(photos[it["category"]], it["mood"], tint_rgb, rng)
            img.save(out_dir / "media" / f"{it['id']}.jpg", format="JPEG", quality=90)
            text = _make_text(it["category"], it["mood"], tint_word, rng, taken)
            sf.write(out_dir / "media" / f"{it['id']}.wav", _make_audio(it["category"], it["mood"], rng),
                     SAMPLE_RATE, subtype="PCM_16", format="WAV")
            attrs = {k: it[k] for k in ("category", "mood", "year", "price", "explicit")}
            fh.write(json.dumps({"id": it["id"], "attributes": attrs, "text": text,
                                 "image": f"media/{it['id']}.jpg", "audio": f"media/{it['id']}.wav"}) + "\n")
            if progress:
                progress(1)
    with open(files.interactions_path, "w") as fh:
        for row in _interactions(items, n_users, seed):
            fh.write(json.dumps(row) + "\n")
    (out_dir / "README.txt").write_text(_readme(n_items, n_users, seed))
    manifest.write_text(json.dumps(args) + "\n")
    return files
