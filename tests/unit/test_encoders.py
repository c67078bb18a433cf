"""The three modality encoders on real media: contract, quality sanity and bad input."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionrec.encoders.base import MODALITIES, Encoder, InvalidContent
from fusionrec.encoders.registry import ENCODERS, get_encoder

TEXTS = [
    "A quiet acoustic folk song with soft vocals.",
    "Heavy distorted guitars and screaming vocals.",
    "Upbeat electronic dance music for the club.",
]
IMAGES = ["chelsea.png", "china.jpg", "coffee.png", "rocket.jpg"]
AUDIO = ["house_lo.wav", "boom.wav", "punch.wav", "whiff.wav"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def loaded() -> dict[str, Encoder]:
    """Every registered encoder, loaded once for the module."""
    return {name: get_encoder(name) for name in ENCODERS}


@pytest.fixture(scope="module")
def text_enc(loaded) -> Encoder:
    return loaded["minilm-l6-v2"]


@pytest.fixture(scope="module")
def image_enc(loaded) -> Encoder:
    return loaded["efficientnet-lite0"]


@pytest.fixture(scope="module")
def audio_enc(loaded) -> Encoder:
    return loaded["librosa-mel-mfcc"]


def read(media_dir: Path, kind: str, name: str) -> bytes:
    return (media_dir / kind / name).read_bytes()


def samples(encoder: Encoder, media_dir: Path) -> list:
    """A few real valid inputs of the encoder's modality."""
    if encoder.modality == "text":
        return list(TEXTS)
    kind, names = ("images", IMAGES) if encoder.modality == "image" else ("audio", AUDIO)
    return [read(media_dir, kind, n) for n in names]


def corrupt_inputs(encoder: Encoder, media_dir: Path) -> dict[str, object]:
    """Inputs the encoder must refuse, by what is wrong with them."""
    if encoder.modality == "text":
        return {"empty": "", "whitespace": " \n\t ", "bytes": b"some text", "none": None}
    rng = np.random.default_rng(0)
    bad: dict[str, object] = {"empty": b"", "random": rng.bytes(4096), "text": b"hello " * 100, "str": "x"}
    if encoder.modality == "image":
        for n in ("china.jpg", "astronaut.png"):
            data = read(media_dir, "images", n)
            bad[f"truncated {n}"] = data[: len(data) // 2]
        bad["wav as image"] = read(media_dir, "audio", "punch.wav")
    else:
        for n in ("house_lo.wav", "house_lo.ogg", "boom.wav"):
            data = read(media_dir, "audio", n)
            bad[f"truncated {n}"] = data[: len(data) // 2]
        bad["png as audio"] = read(media_dir, "images", "horse.png")
    return bad


# ------------------------------------------------------------------ contract, every encoder
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_identity(loaded, name):
    enc = loaded[name]
    assert enc.name == name
    assert enc.modality in MODALITIES
    assert re.fullmatch(rf"{re.escape(name)}@[0-9a-f]{{12}}", enc.version)
    assert enc.version == type(enc).version_for()  # default options (see test_encoder_identity.py)
    assert isinstance(enc.dim, int) and enc.dim > 0


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_shape_dtype_unit_norm(loaded, media_dir, name):
    enc = loaded[name]
    inputs = samples(enc, media_dir)
    out = enc.encode(inputs)
    assert out.shape == (len(inputs), enc.dim)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert enc.encode([]).shape == (0, enc.dim)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_deterministic_and_independent_of_batch(loaded, media_dir, name):
    enc = loaded[name]
    inputs = samples(enc, media_dir)
    first = enc.encode(inputs)
    np.testing.assert_allclose(enc.encode(inputs), first, atol=1e-6)
    # A vector must not depend on what else was in the batch (padding, batch statistics).
    np.testing.assert_allclose(enc.encode(inputs[1:2])[0], first[1], atol=1e-5)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_bad_content_raises_with_modality_and_index(loaded, media_dir, name):
    enc = loaded[name]
    good = samples(enc, media_dir)[0]
    for what, bad in corrupt_inputs(enc, media_dir).items():
        with pytest.raises(InvalidContent) as err:
            enc.prepare(bad)
        assert err.value.modality == enc.modality, what
        with pytest.raises(InvalidContent) as err:
            enc.encode([good, good, bad])
        assert (err.value.modality, err.value.index) == (enc.modality, 2), what


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_warmup(loaded, name):
    loaded[name].warmup()


# ------------------------------------------------------------------ text
def test_text_matches_reference_vectors(text_enc, data_dir):
    """Row i of all-MiniLM-L6-v2.npy is item id i; lfm2k.inter and lfm2k_og_ids.inter are the same
    interactions row by row (item id <-> original artistID), and the tsv is keyed by artistID."""
    folder = data_dir / "lfm2k"
    if not (folder / "all-MiniLM-L6-v2.npy").exists():
        pytest.skip("lfm2k reference data not present")
    ref = np.load(folder / "all-MiniLM-L6-v2.npy")
    item_to_artist: dict[int, int] = {}
    with open(folder / "lfm2k.inter") as a, open(folder / "lfm2k_og_ids.inter") as b:
        next(a), next(b)
        for row, og in zip(a, b):
            item_to_artist[int(row.split()[1])] = int(og.split()[1])
    with open(folder / "lfm2k_text.tsv", encoding="utf-8") as f:
        next(f)
        text_of = {int(k): v for k, v in (line.rstrip("\n").split("\t", 1) for line in f)}
    rows = [0, 1, 2, 4, 700, 1424]  # 2 and 4 are longer than 256 tokens: truncation must match too
    assert len(text_enc.tokenizer(text_of[item_to_artist[4]])["input_ids"]) > 256
    out = text_enc.encode([text_of[item_to_artist[i]] for i in rows])
    np.testing.assert_allclose(out, ref[rows], atol=1e-5)


def test_text_paraphrase_closer_than_unrelated(text_enc):
    a, para, other = text_enc.encode(
        [
            "The cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "Quarterly revenue rose because of strong bond trading.",
        ]
    )
    assert cosine(a, para) > cosine(a, other) + 0.3


# ------------------------------------------------------------------ image
def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_image_flipped_crop_closer_than_other_photo(image_enc, media_dir):
    raw = read(media_dir, "images", "chelsea.png")
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    w, h = img.size
    edited = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((w // 20, h // 20, w - w // 20, h - h // 20))
    orig, twin, other = image_enc.encode([raw, _jpeg(edited), read(media_dir, "images", "coffee.png")])
    assert cosine(orig, twin) > 0.8
    assert cosine(orig, twin) > cosine(orig, other) + 0.3


@pytest.mark.parametrize("name, mode", [("horse.png", "RGBA"), ("coins.png", "L")])
def test_image_rgba_and_grayscale(image_enc, media_dir, name, mode):
    raw = read(media_dir, "images", name)
    assert Image.open(io.BytesIO(raw)).mode == mode
    out = image_enc.encode([raw])
    assert out.shape == (1, 1280) and np.isfinite(out).all()


def test_image_palette_and_transparency(image_enc, media_dir):
    img = Image.open(media_dir / "images" / "rocket.jpg").convert("RGB")
    palette = _png(img.convert("P", palette=Image.Palette.ADAPTIVE))
    rgb, pal = image_enc.encode([_png(img), palette])
    assert cosine(rgb, pal) > 0.9
    # Transparent pixels are composited onto white, not whatever colour they happen to hold.
    transparent_red = _png(Image.new("RGBA", (64, 64), (255, 0, 0, 0)))
    clear, white = image_enc.encode([transparent_red, _png(Image.new("RGB", (64, 64), "white"))])
    np.testing.assert_allclose(clear, white, atol=1e-5)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size", [(100_000, 100_000), (12_000, 8_000)])
def test_image_decompression_bomb_refused(image_enc, size):
    with pytest.raises(InvalidContent, match="too large") as err:
        image_enc.prepare(_png_header_only(*size))
    assert err.value.modality == "image"


def test_image_unsupported_format(image_enc):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="BMP")
    with pytest.raises(InvalidContent, match="not a decodable image"):
        image_enc.prepare(buf.getvalue())


# ------------------------------------------------------------------ audio
def test_audio_same_clip_across_codecs_closer_than_other_clips(audio_enc, media_dir):
    names = ["house_lo.wav", "house_lo.mp3", "house_lo.ogg", "boom.wav", "punch.wav"]
    wav, mp3, ogg, boom, punch = audio_enc.encode([read(media_dir, "audio", n) for n in names])
    same = min(cosine(wav, mp3), cosine(wav, ogg), cosine(mp3, ogg))
    different = max(cosine(x, y) for x in (wav, mp3, ogg) for y in (boom, punch))
    assert same > 0.95
    assert same > different + 0.3


def _wav(y: np.ndarray, sr: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, y.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize(
    "signal, reason",
    [
        (np.zeros(22050), "silent"),
        (0.5 * np.sin(np.arange(441) / 5.0), "too short"),  # 0.02 s
    ],
)
def test_audio_silent_or_too_short(audio_enc, signal, reason):
    with pytest.raises(InvalidContent, match=reason):
        audio_enc.prepare(_wav(signal, 22050))


def test_audio_gain_and_channels_do_not_matter(audio_enc, media_dir):
    import soundfile as sf

    y, sr = sf.read(io.BytesIO(read(media_dir, "audio", "house_lo.wav")), dtype="float32")
    stereo = np.stack([y, y], axis=1)
    base, quiet, both = audio_enc.encode([_wav(y, sr), _wav(0.25 * y, sr), _wav(stereo, sr)])
    assert cosine(base, quiet) > 0.99
    assert cosine(base, both) > 0.999
