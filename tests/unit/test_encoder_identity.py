"""Encoder versions: derived from name, weight digests and the options that change the vectors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from fusionrec.encoders import identity
from fusionrec.encoders.identity import derive_version, file_digest
from fusionrec.encoders.registry import ENCODERS, encoder_class, get_encoder

TEXT, IMAGE, AUDIO = "minilm-l6-v2", "efficientnet-lite0", "librosa-mel-mfcc"


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_version_is_name_at_12_hex(name):
    assert re.fullmatch(rf"{re.escape(name)}@[0-9a-f]{{12}}", encoder_class(name).version_for())


def test_instances_with_the_same_options_share_a_version():
    threads = torch.get_num_threads()  # a process-wide setting: keep it as it is
    a = get_encoder(TEXT, max_length=128)
    b = get_encoder(TEXT, max_length=128, num_threads=threads, device="cpu")
    assert a.version == b.version == encoder_class(TEXT).version_for(max_length=128)
    assert a.version != get_encoder(TEXT).version


@pytest.mark.parametrize("name, options", [
    (TEXT, {"max_length": 128}),
    (AUDIO, {"sample_rate": 44100}),
    (AUDIO, {"max_duration_s": 10.0}),
])
def test_an_option_that_changes_the_vectors_changes_the_version(name, options):
    cls = encoder_class(name)
    assert cls.version_for(**options) != cls.version_for()


@pytest.mark.parametrize("name, options", [
    (TEXT, {"num_threads": 2, "device": "cuda"}),
    (IMAGE, {"num_threads": 2, "device": "cuda", "max_pixels": 1000}),
    (TEXT, {"max_length": 256}),  # the default, spelt out
    (AUDIO, {"sample_rate": 22050.0, "max_duration_s": 30}),  # 30 and 30.0 are one setting
])
def test_options_that_leave_the_vectors_alone_keep_the_version(name, options):
    cls = encoder_class(name)
    assert cls.version_for(**options) == cls.version_for()


def test_an_unknown_option_is_refused():
    with pytest.raises(TypeError):
        encoder_class(AUDIO).version_for(sample_rte=44100)


def test_versions_are_stable_across_processes():
    code = ("from fusionrec.encoders.registry import ENCODERS, encoder_class\n"
            "print(' '.join(encoder_class(n).version_for() for n in sorted(ENCODERS)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [encoder_class(n).version_for() for n in sorted(ENCODERS)]


def test_the_weight_digest_follows_the_file_bytes(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    before = derive_version("fake", {"w": weights}, {"k": 1})
    assert before == derive_version("fake", {"w": weights}, {"k": 1})
    assert before != derive_version("fake", {"w": weights}, {"k": 2})
    weights.write_bytes(b"b" * 1001)  # another size: the cached digest of the old file is not reused
    assert derive_version("fake", {"w": weights}, {"k": 1}) != before


def test_a_weight_file_is_hashed_once_per_process(tmp_path, monkeypatch):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 10)
    calls = []
    real_sha256 = identity.hashlib.sha256

    def counting_sha256(*args):
        calls.append(1)
        return real_sha256(*args)

    first = file_digest(weights)
    monkeypatch.setattr(identity.hashlib, "sha256", counting_sha256)
    assert file_digest(weights) == first and not calls
