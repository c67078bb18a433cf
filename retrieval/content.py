"""Content retention: the raw content of items (text, image bytes, audio bytes) kept by content hash.

Kept so that vectors can be recomputed later (another encoder, another encoder option) without
asking callers to upload their catalog again. Content is addressed by its sha256: writing the
same bytes twice stores them once, and items share identical content. The store rows of an
item record modality -> sha256 (``StoredItem.content``); the bytes live here.

``LocalContentStore`` keeps one file per hash under a folder (``<root>/<sha256[:2]>/<sha256>``),
written atomically; a folder on a shared file system serves a cluster with the same code. Other
backends (an object store) subclass ``ContentStore``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from fusionrec.core.errors import NotFound

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def content_bytes(content: str | bytes | bytearray | memoryview) -> bytes:
    """The bytes kept for one modality's content: text as UTF-8, binary content as is."""
    if isinstance(content, str):
        return content.encode("utf-8")
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    raise TypeError(f"content must be str or bytes, got {type(content).__name__}")


def content_digest(data: bytes) -> str:
    """sha256 hex of ``data``: the key content is kept under."""
    return hashlib.sha256(data).hexdigest()


def check_digest(digest: object) -> str:
    """``digest`` if it is a sha256 hex string (64 lowercase hex digits); ValueError otherwise."""
    if not isinstance(digest, str) or _DIGEST_RE.fullmatch(digest) is None:
        raise ValueError(f"not a sha256 content hash: {digest!r}")
    return digest


class ContentStore(ABC):
    """Raw content by sha256. Writes are idempotent; content is never overwritten with other bytes.

    Nothing is deleted when an item is: content is shared by hash between items (and with
    items that may come back), so deleting it would need reference counting. Orphans (content
    of deleted items, or of an upsert that failed after its content was written) are harmless.
    """

    @abstractmethod
    def put(self, data: bytes) -> str:
        """Keep ``data``; returns its sha256 hex. Durable when it returns."""

    @abstractmethod
    def get(self, digest: str) -> bytes:
        """The bytes kept under ``digest``.

        Raises:
            NotFound: nothing is kept under ``digest``.
        """

    @abstractmethod
    def has(self, digest: str) -> bool:
        """Whether content is kept under ``digest``."""

    def put_many(self, contents: dict[str, str | bytes]) -> dict[str, str]:
        """Keep one item's contents (modality -> str or bytes); returns modality -> sha256."""
        return {m: self.put(content_bytes(c)) for m, c in contents.items()}


class LocalContentStore(ContentStore):
    """One file per hash under ``root`` (``<root>/<sha256[:2]>/<sha256>``); thread- and process-safe.

    A file is written under a temporary name in its final folder, flushed to disk, then renamed:
    readers see the whole content or nothing, and a crashed write leaves only a ``.tmp-*`` file.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where ``digest`` is (or would be) kept."""
        digest = check_digest(digest)
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        data = bytes(data)
        digest = content_digest(data)
        path = self.path(digest)
        if path.is_file() and path.stat().st_size == len(data):
            return digest  # already kept: content-addressed, so the bytes are the same
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def get(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no content kept under {digest} in {self.root}") from None

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()


def open_content_store(uri: str | Path) -> ContentStore:
    """The content store at ``uri``: a folder path (or ``file://`` URI); other schemes are refused."""
    text = str(uri)
    if text.startswith("file://"):
        return LocalContentStore(text[len("file://"):])
    if "://" in text:
        raise ValueError(f"content store {text!r}: only local or shared folders are supported (a path or file://)")
    return LocalContentStore(text)
