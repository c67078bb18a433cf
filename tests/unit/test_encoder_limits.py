"""Bounded work per input: hostile content is refused from its header, naming the limit, fast.

Every hostile input is built in memory (bench/reliability/media.py, shared with `make reliability`):
a 16-bit PNG of zeros just under PIL's pixel cap (~170 KB that decodes to ~180 MB), a PNG header claiming 100 Mpx, 5 MB of text, a WAV whose
header claims ten minutes, a FLAC at 384 kHz x 8 channels. The wall-clock bounds are generous
(CI machines vary): a refusal from a header takes milliseconds, decoding the input takes seconds.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fusionrec.bench.reliability.media import flac_mostly_silent, png_header_only, png_of_zeros, wav_of_silence
from fusionrec.encoders.base import InvalidContent
from fusionrec.encoders.registry import get_encoder

REFUSAL_S = 0.5  # generous: each refusal below measured in single milliseconds


# ------------------------------------------------------------------ hostile input builders
def apng_of(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def text_enc():
    return get_encoder("minilm-l6-v2")


@pytest.fixture(scope="module")
def image_enc():
    return get_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def audio_enc():
    return get_encoder("librosa-mel-mfcc")


def assert_refused_fast(encoder, content, limit: str) -> InvalidContent:
    """prepare refuses ``content`` naming ``limit``, well within ``REFUSAL_S``."""
    start = time.perf_counter()
    with pytest.raises(InvalidContent) as err:
        encoder.prepare(content)
    elapsed = time.perf_counter() - start
    assert err.value.modality == encoder.modality
    assert limit in err.value.reason, err.value.reason
    assert elapsed < REFUSAL_S, f"refusal took {elapsed:.3f} s: {err.value.reason}"
    return err.value


@pytest.mark.parametrize("name, option", [
    ("minilm-l6-v2", {"max_text_bytes": 10}),
    ("efficientnet-lite0", {"max_pixels": 10, "max_decoded_bytes": 10}),
    ("librosa-mel-mfcc", {"max_decoded_samples": 10}),
])
def test_limits_do_not_change_the_version(name, option):
    from fusionrec.encoders.registry import encoder_class

    assert encoder_class(name).version_for(**option) == encoder_class(name).version_for()


# ------------------------------------------------------------------ text
def test_text_of_5_mb_refused_before_tokenising(text_enc):
    words = ("the quick brown fox jumps over the lazy dog " * 120_000)[: 5 * 2**20]
    assert_refused_fast(text_enc, words, "max_text_bytes")


def test_text_limit_counts_utf8_bytes_not_characters(text_enc):
    limit = text_enc.max_text_bytes
    assert_refused_fast(text_enc, "語" * (limit // 3 + 1), "max_text_bytes")  # fewer chars than bytes
    assert text_enc.prepare("ab " * (limit // 3))  # just under: accepted


def long_texts() -> dict[str, str]:
    rng = np.random.default_rng(7)
    vocab = ["music", "Beyoncé", "naïve", "rock'n'roll", "東京", "drum-and-bass", "(live)", "Ωmega", "x" * 150,
             "ΣΟΦΙΑΣ", "\t", "\n", "  ", "...", "co-operate", "ﬁnal", "Ⅻ", "\u00ad", "🎸", "e\u0301"]
    mixed = " ".join(rng.choice(vocab, 2500))
    return {"english": "a quiet acoustic folk song with soft vocals and a slow, sad melody. " * 300,
            "mixed": mixed, "no spaces": "x" * 20_000, "cjk without spaces": "東京の音楽" * 2000,
            "spaces then words": " " * 30_000 + "word " * 1000}


@pytest.mark.parametrize("max_length", [256, 32])
@pytest.mark.parametrize("kind", sorted(long_texts()))
def test_text_head_keeps_exactly_the_tokens_of_the_whole_text(text_enc, kind, max_length):
    text = long_texts()[kind]
    enc = text_enc if max_length == text_enc.max_length else get_encoder("minilm-l6-v2", max_length=max_length)
    head = enc.prepare(text)
    assert text.startswith(head)
    ids = [enc.tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in (text, head)]
    assert ids[0] == ids[1]
    if kind in ("english", "mixed"):
        assert len(head) < len(text) // 4  # only a head was tokenised


def test_text_long_input_same_vector_as_tokenising_it_whole(text_enc):
    text = long_texts()["mixed"]
    whole = text_enc.embed([text])  # embed tokenises everything it is given, then truncates
    np.testing.assert_allclose(text_enc.encode([text]), whole, atol=1e-6)


# ------------------------------------------------------------------ image
@pytest.fixture(scope="module")
def png16_near_old_cap() -> bytes:
    """The issue's work bomb: 9400 x 9400 16-bit grey (88 Mpx, under PIL's 89.5 Mpx) in ~170 KB."""
    return png_of_zeros(9400, 9400, bit_depth=16, colour_type=0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_16bit_png_bomb_refused_from_header(image_enc, png16_near_old_cap):
    assert len(png16_near_old_cap) < 200_000
    assert_refused_fast(image_enc, png16_near_old_cap, "max_pixels")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size", [(100_000, 100_000), (20_000, 20_000), (50_000_001, 1)])
def test_image_huge_dimensions_refused_from_header(image_enc, size):
    assert_refused_fast(image_enc, png_header_only(*size), "max_pixels")


def test_image_16bit_rgba_under_the_pixel_cap_refused_by_decoded_bytes(image_enc):
    w = h = 7000  # 49 Mpx < max_pixels, but 8 bytes a pixel: 392 MB
    assert w * h < image_enc.max_pixels
    assert_refused_fast(image_enc, png_header_only(w, h, bit_depth=16, colour_type=6), "max_decoded_bytes")


@pytest.mark.parametrize("bit_depth, colour_type, expected", [
    (8, 0, 1), (16, 0, 2), (1, 0, 1), (4, 3, 1), (8, 3, 1), (8, 4, 2), (16, 4, 4),
    (8, 2, 3), (16, 2, 6), (8, 6, 4), (16, 6, 8),
])
def test_image_decoded_bytes_count_mode_and_bit_depth(bit_depth, colour_type, expected):
    from fusionrec.encoders.image_efficientnet import decoded_bytes_per_pixel

    img = Image.open(io.BytesIO(png_header_only(10, 10, bit_depth, colour_type)))
    assert decoded_bytes_per_pixel(img) == expected


def test_image_decoded_bytes_cap_uses_bit_depth_and_jpeg_draft():
    enc = get_encoder("efficientnet-lite0", max_decoded_bytes=4_000_000)
    assert enc.prepare(png_of_zeros(1000, 1000, 8, 2)).shape == (3, 224, 224)  # 3 MB
    assert_refused_fast(enc, png_of_zeros(1000, 1000, 16, 2), "max_decoded_bytes")  # 6 MB
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (90, 120, 30)).save(buf, format="JPEG")  # 36 MB in full...
    assert enc.prepare(buf.getvalue()).shape == (3, 224, 224)  # ...decoded at 1/4 scale: 2.25 MB


def test_image_16bit_grey_to_8bit_rounds_as_before():
    from fusionrec.encoders.image_efficientnet import _grey_to_8bit

    rng = np.random.default_rng(3)
    grey16 = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    grey16[0, :3] = [0, 65535, 32767]
    before = np.clip(grey16.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(_grey_to_8bit(Image.fromarray(grey16)), before)
    grey32 = rng.integers(-1000, 2**31 - 1, (37, 53), dtype=np.int32)
    top = float(grey32.max())
    before = np.clip(grey32.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(_grey_to_8bit(Image.fromarray(grey32, mode="I")), before)


def test_image_16bit_png_still_encodes(image_enc):
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    out = image_enc.encode([buf.getvalue()])
    assert out.shape == (1, 1280) and np.isfinite(out).all()


def test_image_animation_costs_its_first_frame_only(image_enc):
    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(60)]
    animated = apng_of(frames)
    assert Image.open(io.BytesIO(animated)).n_frames == 60
    start = time.perf_counter()
    first = image_enc.prepare(animated)
    assert time.perf_counter() - start < REFUSAL_S
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG")
    assert torch_equal(first, image_enc.prepare(buf.getvalue()))


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


# ------------------------------------------------------------------ audio
def test_audio_384khz_8_channel_flac_refused_from_header(audio_enc):
    flac = flac_mostly_silent(30, 384_000, 8)  # 92 M samples decoded, were it accepted
    assert len(flac) < 200_000
    assert_refused_fast(audio_enc, flac, "MAX_SAMPLE_RATE_HZ")


def test_audio_decoded_samples_cap_refused_from_header(audio_enc):
    flac = flac_mostly_silent(30, 192_000, 8)  # a plausible rate, but 46 M samples in 30 s
    assert_refused_fast(audio_enc, flac, "max_decoded_samples")
    short = flac_mostly_silent(5, 192_000, 8)  # 7.7 M samples: under the cap
    assert audio_enc.prepare(short).dtype == np.float32


def test_audio_cap_counts_only_the_analysed_prefix():
    from fusionrec.encoders.audio_librosa import LibrosaAudioEncoder

    enc = LibrosaAudioEncoder(max_duration_s=2.0, max_decoded_samples=2 * 48_000 * 2)
    assert len(enc.prepare(flac_mostly_silent(10, 48_000, 2))) > 0  # 10 s long, 2 s analysed
    assert_refused_fast(enc, flac_mostly_silent(10, 48_000, 3), "max_decoded_samples")


def test_audio_ten_minutes_of_silence_not_decoded_whole(audio_enc, monkeypatch):
    wav = wav_of_silence(600)  # 9.6 MB
    read_frames = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        out = real_read(self, frames, *args, **kwargs)
        read_frames.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    assert_refused_fast(audio_enc, wav, "silent")
    assert sum(read_frames) == int(audio_enc.max_duration_s * 8000)  # 30 s of 600


def test_audio_header_claiming_ten_minutes_refused(audio_enc):
    header = wav_of_silence(600, 48_000, 2)[:44] + bytes(4096)
    assert_refused_fast(audio_enc, header, "truncated")


def test_audio_block_decoding_equals_one_read(media_dir):
    from fusionrec.encoders.audio_librosa import _read_mono

    for name in ("house_lo.wav", "house_lo.mp3", "house_lo.ogg", "boom.wav"):
        data = (media_dir / "audio" / name).read_bytes()
        with sf.SoundFile(io.BytesIO(data)) as f:
            whole = f.read(frames=int(30 * f.samplerate), dtype="float32", always_2d=True).mean(axis=1)
        with sf.SoundFile(io.BytesIO(data)) as f:
            blocks = _read_mono(f, int(30 * f.samplerate), 1152)  # the MP3 frame: exact as one read
        np.testing.assert_array_equal(blocks, whole, err_msg=name)
