"""Audio encoder: hand-crafted log-mel / MFCC statistics (librosa), no learned weights.

Pipeline: decode (libsndfile) -> mono -> first ``max_duration_s`` (30 s) -> resample to
``sample_rate`` (22,050 Hz) -> trim leading/trailing silence (60 dB under the peak) ->
STFT (n_fft 2048, hop 512) -> 64 mel bands 30-8,000 Hz in dB relative to the clip's loudest
bin, floored 80 dB below it (so gain does not matter) -> the statistics below.

Feature layout (``dim`` = 174, float32, the whole vector L2-normalised):

=================  ===  =====================================================================
group              dim  content
=================  ===  =====================================================================
``shape``           64  per-band mean dB, bands more than 35 dB under the loudest band
                        floored ("absent"), minus a pink-noise (1/f) reference, minus its own
                        mean: the spectral envelope without level or the usual tilt
``band_dynamics``   64  per-band std over time (dB) minus its own mean: which bands move
``mfcc_dynamics``   19  log std over time of MFCC 1-19, plus 0.6 log k (the usual decay over
                        coefficient k), minus its own mean: which timbre axes vary
``mfcc_flux``       19  same for the frame-to-frame change of MFCC 1-19 (0.4 log k)
``global``           8  loudness dynamics, mean band std, centroid (mean, spread), flatness,
                        zero-crossing rate, onset rate, non-quiet fraction; each centred and
                        scaled with fixed constants to roughly [-1, 1]
=================  ===  =====================================================================

Each group is divided by a fixed typical magnitude and weighted by weight/sqrt(dim)
(``GROUPS``) so that no group dominates. Why the centring: raw dB statistics share a large
common component (every sound is loudest at low frequencies, every band-limited file has
the same empty top bands), which makes any two clips ~0.99 cosine-similar. With it, on the
sample media the same clip as WAV/OGG/MP3 is 0.99 similar and different clips 0.1-0.6.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import soundfile as sf

from fusionrec.encoders.base import Encoder, InvalidContent, l2_normalise
from fusionrec.encoders.identity import package_version

#: libsndfile container names we accept (WAVEX/RF64 are WAV variants).
FORMATS = frozenset({"WAV", "WAVEX", "RF64", "OGG", "MP3", "FLAC"})
MIN_DURATION_S = 0.05
SILENCE_PEAK = 1e-4  # -80 dBFS: nothing audible to describe
N_FFT, HOP, N_MELS, FMIN, FMAX = 2048, 512, 64, 30.0, 8000.0
TRIM_DB = 60.0  # leading/trailing frames this far below the peak count as silence
TOP_DB = 80.0  # log-mel floor below the clip's loudest bin
SHAPE_FLOOR_DB = 35.0  # bands this far below the loudest band all look alike ("absent")
N_MFCC = 20  # c0 (overall level) is dropped; 1..19 kept
# (name, dim, weight, scale): a group's features are divided by `scale` (a typical magnitude,
# dB or MFCC units), then multiplied by weight/sqrt(dim) so every group has a comparable norm.
GROUPS = (
    ("shape", N_MELS, 1.0, 5.0),
    ("band_dynamics", N_MELS, 0.8, 2.5),
    ("mfcc_dynamics", N_MFCC - 1, 0.6, 0.25),
    ("mfcc_flux", N_MFCC - 1, 0.6, 0.2),
    ("global", 8, 0.8, 1.0),
)
# libsndfile reports a short chunk as "data : 78331 (should be 39174)"; 0xFFFFFFFF = streamed.
_SHORT_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)


class LibrosaAudioEncoder(Encoder):
    """Encoded audio bytes (WAV/OGG/MP3/FLAC) -> float32 (174,) unit vector (layout above).

    ``prepare`` returns the decoded mono signal, float32 (samples,) at ``sample_rate``,
    at most ``max_duration_s`` long, silence trimmed. Truncated WAV/FLAC/Ogg files are
    refused; MP3 has no length field, so an MP3 cut at a frame boundary is just shorter audio.

    Args:
        sample_rate: analysis rate in Hz; the input is resampled to it.
        max_duration_s: only the first this-many seconds are decoded and described.
        max_decoded_samples: inputs whose analysed prefix holds more samples (frames x
            channels, before the mono mix) are refused (default ``MAX_DECODED_SAMPLES``).

    Limits (bounded work per clip, checked from the header before any sample is decoded; they
    do not change the vectors of accepted clips, so they are not part of ``version``):

    - ``max_decoded_samples`` (12,000,000, 46 MB of float32): min(duration, ``max_duration_s``)
      x rate x channels. 30 s of 48 kHz 7.1, 96 or 192 kHz stereo fit; 30 s at 384 kHz x 8
      channels (92 M samples) does not.
    - ``MAX_SAMPLE_RATE_HZ`` (192 kHz, the top of common hi-res audio; the analysis stops at
      8 kHz) and ``MIN_SAMPLE_RATE_HZ`` (1 kHz); ``MAX_CHANNELS`` (16).
    - only ``max_duration_s`` of frames are decoded, ``DECODE_BLOCK_FRAMES`` at a time, each
      block mixed to mono at once: a ten-minute file costs what its first 30 s cost.
    """

    name = "librosa-mel-mfcc"
    modality = "audio"
    vector_options = ("sample_rate", "max_duration_s")
    #: Default ``max_decoded_samples``: frames x channels decoded per clip, before the mono mix.
    MAX_DECODED_SAMPLES = 12_000_000
    MAX_SAMPLE_RATE_HZ = 192_000
    MIN_SAMPLE_RATE_HZ = 1_000
    MAX_CHANNELS = 16
    #: Frames decoded per read; each block is mixed to mono before the next is decoded. A multiple
    #: of every MPEG audio frame (384, 576, 1152 samples): MP3 then decodes bit for bit as in one read.
    DECODE_BLOCK_FRAMES = 57 * 1152

    @classmethod
    def fixed_settings(cls) -> dict[str, Any]:
        """No weights: the feature configuration and the libraries that compute it (soxr resamples)."""
        return {
            "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "fmin": FMIN, "fmax": FMAX, "trim_db": TRIM_DB,
            "top_db": TOP_DB, "shape_floor_db": SHAPE_FLOOR_DB, "n_mfcc": N_MFCC, "groups": GROUPS,
            "librosa": package_version("librosa"), "soxr": package_version("soxr"),
        }

    def __init__(
        self, sample_rate: int = 22050, max_duration_s: float = 30.0, max_decoded_samples: int = MAX_DECODED_SAMPLES
    ) -> None:
        import librosa  # imported here: its numba kernels compile on first import (~16 s)

        if sample_rate < 2 * FMAX:
            raise ValueError(f"sample_rate must be >= {2 * FMAX:.0f} Hz, got {sample_rate}")
        if max_duration_s < 1.0:
            raise ValueError(f"max_duration_s must be >= 1, got {max_duration_s}")
        if max_decoded_samples < 1:
            raise ValueError(f"max_decoded_samples must be >= 1, got {max_decoded_samples}")
        self._librosa = librosa
        self.max_decoded_samples = max_decoded_samples
        self.sample_rate = sample_rate
        self.max_duration_s = max_duration_s
        self._mel_fb = librosa.filters.mel(sr=sample_rate, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
        self._freqs = librosa.fft_frequencies(sr=sample_rate, n_fft=N_FFT)  # (1025,)
        # Mel envelope of pink noise (power ~ 1/f): the typical tilt of natural sounds.
        pink = 10 * np.log10(self._mel_fb @ (1.0 / np.maximum(self._freqs, FMIN)))
        self._pink_db = (pink - pink.mean()).astype(np.float32)  # (64,)
        self._log_k = np.log(np.arange(1, N_MFCC))  # (19,)
        self._weights = np.concatenate([np.full(d, w / (s * np.sqrt(d))) for _, d, w, s in GROUPS])

    @property
    def dim(self) -> int:
        return sum(d for _, d, _, _ in GROUPS)

    # ------------------------------------------------------------------ decoding
    def prepare(self, content: Any) -> np.ndarray:
        """Audio bytes -> mono float32 (samples,) at ``sample_rate``. Raises InvalidContent("audio", ...)."""
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise InvalidContent("audio", f"expected bytes, got {type(content).__name__}")
        if len(content) == 0:
            raise InvalidContent("audio", "audio is empty (0 bytes)")
        y, sr = self._decode(content)
        if len(y) < MIN_DURATION_S * sr:
            raise InvalidContent("audio", f"audio too short ({len(y) / sr:.3f} s < {MIN_DURATION_S} s)")
        if not np.isfinite(y).all():
            raise InvalidContent("audio", "audio contains NaN or infinite samples")
        if np.abs(y).max() < SILENCE_PEAK:
            raise InvalidContent("audio", "audio is silent")
        if sr != self.sample_rate:
            y = self._librosa.resample(y, orig_sr=sr, target_sr=self.sample_rate, res_type="soxr_hq")
        # Drop leading/trailing silence (e.g. MP3 encoder delay) so padding doesn't look like content.
        y, _ = self._librosa.effects.trim(y, top_db=TRIM_DB, frame_length=N_FFT, hop_length=HOP)
        if len(y) < MIN_DURATION_S * self.sample_rate:
            raise InvalidContent("audio", f"audio too short once silence is trimmed (< {MIN_DURATION_S} s)")
        return np.ascontiguousarray(y, dtype=np.float32)

    def _decode(self, content: bytes | bytearray | memoryview) -> tuple[np.ndarray, int]:
        """The first ``max_duration_s`` as mono float32 (samples,) at the file's rate, and that rate.

        The header (format, rate, channels, frames, chunk sizes) is checked before any sample is
        decoded; frames are then read and mixed to mono block by block.
        """
        try:
            with sf.SoundFile(io.BytesIO(content)) as f:
                if f.format not in FORMATS:
                    raise InvalidContent("audio", f"unsupported format {f.format} (accepted: WAV, OGG, MP3, FLAC)")
                frames = self._check_header(f.samplerate, f.channels, f.frames)
                _check_complete(f.extra_info)
                return _read_mono(f, frames, self.DECODE_BLOCK_FRAMES), f.samplerate
        except InvalidContent:
            raise
        except Exception as err:  # LibsndfileError, RuntimeError from a codec, ...
            raise InvalidContent("audio", f"not decodable audio: {_short(err)}") from None

    def _check_header(self, sr: int, channels: int, frames: int) -> int:
        """Frames to decode: the first ``max_duration_s`` of the stream. Refuses an implausible rate or
        channel count, or a prefix over ``max_decoded_samples``."""
        if not self.MIN_SAMPLE_RATE_HZ <= sr <= self.MAX_SAMPLE_RATE_HZ:
            raise InvalidContent("audio", f"implausible sample rate {sr} Hz (MIN_SAMPLE_RATE_HZ "
                                          f"{self.MIN_SAMPLE_RATE_HZ}, MAX_SAMPLE_RATE_HZ {self.MAX_SAMPLE_RATE_HZ})")
        if not 1 <= channels <= self.MAX_CHANNELS:
            raise InvalidContent("audio", f"implausible stream: {channels} channels > MAX_CHANNELS {self.MAX_CHANNELS}")
        wanted = int(self.max_duration_s * sr)
        frames = wanted if frames <= 0 else min(frames, wanted)  # 0 or less: length unknown
        if frames * channels > self.max_decoded_samples:
            raise InvalidContent(
                "audio", f"too many samples to decode: {frames / sr:.1f} s x {sr} Hz x {channels} channels = "
                         f"{frames * channels} > max_decoded_samples {self.max_decoded_samples}")
        return frames

    # ------------------------------------------------------------------ features
    def embed(self, prepared: list[np.ndarray]) -> np.ndarray:
        """n mono signals -> float32 (n, 174), rows of unit norm."""
        return l2_normalise(np.stack([self.features(y) for y in prepared]))

    def features(self, y: np.ndarray) -> np.ndarray:
        """One mono signal at ``sample_rate`` -> weighted, unnormalised float32 (174,) (layout above)."""
        lr = self._librosa
        if len(y) < N_FFT:  # pad very short clips to one full window
            y = np.pad(y, (0, N_FFT - len(y)))
        mag = np.abs(lr.stft(y, n_fft=N_FFT, hop_length=HOP))  # (1025, T)
        power = mag**2
        mel_db = 10 * np.log10(np.maximum(self._mel_fb @ power, 1e-10))  # (64, T)
        mel_db = np.maximum(mel_db - mel_db.max(), -TOP_DB)  # relative to the loudest bin

        band_mean = mel_db.mean(axis=1)  # (64,)
        band_mean = np.maximum(band_mean, band_mean.max() - SHAPE_FLOOR_DB) - self._pink_db
        shape = band_mean - band_mean.mean()
        band_std = mel_db.std(axis=1)
        band_dynamics = band_std - band_std.mean()

        mfcc = lr.feature.mfcc(S=mel_db, n_mfcc=N_MFCC)[1:]  # (19, T); c0 is just level
        # log std relative to the typical ~k^-0.6 (~k^-0.4 for flux) decay over coefficients k,
        # minus its mean: which coefficients move more than usual, not how much overall.
        mfcc_dynamics = np.log(mfcc.std(axis=1) + 0.1) + 0.6 * self._log_k
        mfcc_dynamics -= mfcc_dynamics.mean()
        flux = np.diff(mfcc, axis=1) if mfcc.shape[1] > 1 else np.zeros_like(mfcc)
        mfcc_flux = np.log(flux.std(axis=1) + 0.1) + 0.4 * self._log_k
        mfcc_flux -= mfcc_flux.mean()

        frame_db = 10 * np.log10(np.maximum(power.sum(axis=0), 1e-10))  # (T,) frame energy
        frame_db = np.maximum(frame_db - frame_db.max(), -TOP_DB)
        centroid = (self._freqs @ mag) / np.maximum(mag.sum(axis=0), 1e-10)  # (T,) Hz
        octaves = np.log2(np.maximum(centroid, FMIN) / 1500.0)
        flatness = lr.feature.spectral_flatness(S=mag)[0]  # (T,) in (0, 1]
        zcr = np.count_nonzero(np.diff(np.signbit(y))) / len(y)  # crossings per sample
        onsets = lr.onset.onset_detect(
            onset_envelope=lr.onset.onset_strength(S=mel_db, sr=self.sample_rate), sr=self.sample_rate
        )
        seconds = len(y) / self.sample_rate
        summary = np.array(
            [
                (frame_db.std() - 8.0) / 6.0,  # loudness dynamics (dB)
                (band_std.mean() - 8.0) / 4.0,  # overall spectro-temporal variation (dB)
                octaves.mean(),  # brightness, octaves around 1.5 kHz
                octaves.std() - 0.5,  # how much brightness moves
                (np.log10(np.maximum(flatness, 1e-8)).mean() + 4.0) / 2.0,  # noisy (0) vs tonal (-5)
                (np.log10(max(zcr, 1e-4)) + 1.3) / 0.5,
                (np.log1p(len(onsets) / seconds) - 1.0) / 1.0,  # onsets per second
                ((frame_db > -40.0).mean() - 1.0) / 0.3,  # fraction of frames that are not quiet
            ]
        )
        feats = np.concatenate([shape, band_dynamics, mfcc_dynamics, mfcc_flux, summary])
        return (feats * self._weights).astype(np.float32)

    def warmup(self) -> None:
        """Decode + resample + every feature once, so numba kernels are compiled before traffic."""
        t = np.arange(int(0.5 * 16000)) / 16000
        tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t))
        buf = io.BytesIO()
        sf.write(buf, tone.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
        self.encode([buf.getvalue()])


def _read_mono(f: sf.SoundFile, frames: int, block_frames: int) -> np.ndarray:
    """Up to ``frames`` frames of an open file as mono float32 (samples,), decoded ``block_frames``
    at a time and mixed per block, so only one block of all channels is ever held."""
    out = np.empty(frames, dtype=np.float32)
    done = 0
    while done < frames:
        block = f.read(frames=min(block_frames, frames - done), dtype="float32", always_2d=True)
        if len(block) == 0:
            break
        out[done : done + len(block)] = block.mean(axis=1)
        done += len(block)
    return out[:done]


def _check_complete(log: str) -> None:
    """Refuse streams whose headers promise more data than the bytes hold (truncated uploads)."""
    for declared, actual in _SHORT_CHUNK.findall(log):
        if int(actual) < int(declared) < 0xFFFF_0000:  # huge sizes are "unknown length" placeholders
            reason = f"truncated file: header declares {declared} data bytes, {actual} present"
            raise InvalidContent("audio", reason)
    if "lacks an end-of-stream" in log:
        raise InvalidContent("audio", "truncated Ogg stream: last page lacks the end-of-stream flag")


def _short(err: Exception) -> str:
    # libsndfile messages embed the repr of our BytesIO; keep only the reason.
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>:?\s*", "", str(err)).strip() or type(err).__name__
