"""Hostile and ordinary media built in memory: real bytes (PIL, zlib, libsndfile), nothing on disk.

Bombs are cheap to build and small on the wire (a 16-bit PNG of zeros compresses ~2000:1, a FLAC of
silence to a few bytes per second) but would cost seconds of CPU and hundreds of MB if decoded.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import soundfile as sf
from PIL import Image

PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A valid PNG whose pixels are all zero, compressed row by row (never held whole)."""
    row = b"\0" * (1 + (width * PNG_CHANNELS[colour_type] * bit_depth + 7) // 8)  # filter byte + samples
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG header declaring width x height, with almost no pixel data behind it."""
    small = png_of_zeros(1, 1, bit_depth, colour_type)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return small[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + small[33:]


def picture(mode: str = "RGB", size: tuple[int, int] = (64, 48), fmt: str = "PNG", seed: int = 0) -> bytes:
    """A small real image (gradient plus noise) in ``mode`` and ``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = np.clip(np.linspace(0, 255, w)[None, :, None] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def wav_of_silence(seconds: float, sample_rate: int = 8000, channels: int = 1) -> bytes:
    """A real 16-bit PCM WAV of digital silence (ten minutes at 8 kHz mono: 9.6 MB)."""
    frames = int(seconds * sample_rate)
    data_bytes = frames * channels * 2
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * channels * 2,
                                    channels * 2, 16)
    return header + b"data" + struct.pack("<I", data_bytes) + bytes(data_bytes)


def tone(seconds: float = 1.0, sample_rate: int = 16_000, channels: int = 1, fmt: str = "WAV",
         subtype: str = "PCM_16") -> bytes:
    """A real tone with a little noise (what an audio encoder can describe)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    mono = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, np.repeat(mono[:, None], channels, axis=1).astype(np.float32), sample_rate, format=fmt,
             subtype=subtype)
    return buf.getvalue()


def flac_mostly_silent(seconds: float, sample_rate: int, channels: int) -> bytes:
    """A FLAC of a 10 ms click then digital silence, written block by block: a few bytes per
    second of audio, however high the rate and channel count (30 s at 384 kHz x 8: ~100 KB)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sample_rate, channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((sample_rate, channels), dtype=np.float32)
        block[: sample_rate // 100] = 0.5
        f.write(block)
        block[:] = 0.0
        for _ in range(int(seconds) - 1):
            f.write(block)
    return buf.getvalue()


def noise_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` random bytes: no format recognises them."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
