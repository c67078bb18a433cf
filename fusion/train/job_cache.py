"""Finished training jobs kept on disk, so an interrupted `fusionrec evaluate` resumes where it stopped.

A job's key is its spec plus a digest of the model and training code (fusionrec.fusion and .fusion.train):
changing either retrains, never reuses a result of other code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

from fusionrec.fusion import towers

#: Sources whose change invalidates every cached job (the served towers and the training package) ...
_CODE_DIRS = (Path(towers.__file__).parent, Path(towers.__file__).parent / "train")
#: ... except those that only write reports or keep this cache (a job's result does not depend on them).
_NOT_RESULTS = ("report.py", "job_cache.py")


def code_digest() -> str:
    """sha256 over the .py files of fusionrec.fusion and fusionrec.fusion.train that shape results."""
    digest = hashlib.sha256()
    for folder in _CODE_DIRS:
        for path in sorted(p for p in folder.glob("*.py") if p.name not in _NOT_RESULTS):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class JobCache:
    """One pickle per finished job under ``root`` (written whole via a rename: a killed run leaves none half)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._code = code_digest()

    def key(self, spec: dict[str, Any]) -> str:
        """Stable key of ``spec`` (progress/threads do not change a result) under the current code."""
        kept = {k: v for k, v in spec.items() if k not in ("progress", "threads")}
        blob = json.dumps(kept, sort_keys=True, default=str) + self._code
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        path = self.root / f"{self.key(spec)}.pkl"
        if not path.exists():
            return None
        with open(path, "rb") as fh:
            return pickle.load(fh)

    def put(self, spec: dict[str, Any], result: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{self.key(spec)}.pkl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(result, fh)
        tmp.replace(path)
