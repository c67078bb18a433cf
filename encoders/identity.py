"""Encoder identity: a version derived from the encoder name, a digest of the weight files it
loads and every setting that changes its vectors.

Two encoders with the same version produce comparable vectors; anything that changes the
vectors (other weights, a text ``max_length``, an audio sample rate) changes the version, so a
store written with one refuses vectors from the other instead of mixing two spaces. Weight
files are hashed (sha256 of their bytes) once per process and file: the digest is cached by
path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

#: hex digits of the digest in a version (``minilm-l6-v2@3f9a1c2b7d10``)
VERSION_HEX = 12
_CHUNK = 1 << 20

_file_digests: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def file_digest(path: str | Path) -> str:
    """sha256 hex of the file's bytes, computed once per (path, size, mtime) in this process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _lock:
        cached = _file_digests.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _file_digests[key] = digest
    return digest


def package_version(name: str) -> str:
    """Installed version of distribution ``name``, or "absent"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _canonical(value: Any) -> Any:
    """JSON-ready and stable: integral floats as ints (30.0 and 30 are one setting), tuples as lists."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_canonical(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    return str(value)


def derive_version(name: str, weight_files: Mapping[str, str | Path], settings: Mapping[str, Any]) -> str:
    """``<name>@<12 hex>`` over the weight files' digests (by label, not by install path, so the
    version is the same on every machine) and the settings that shape the vectors."""
    payload = {
        "name": name,
        "weights": {label: file_digest(p) for label, p in sorted(weight_files.items())},
        "settings": _canonical(dict(settings)),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return f"{name}@{hashlib.sha256(blob).hexdigest()[:VERSION_HEX]}"
