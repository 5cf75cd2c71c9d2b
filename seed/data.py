"""Deterministic avatar keys and contents: object ``i`` is the same on every run."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

_KINDS = (
    ("png", "image/png", b"\x89PNG\r\n\x1a\n"),
    ("jpg", "image/jpeg", b"\xff\xd8\xff\xe0"),
    ("webp", "image/webp", b"RIFF\x00\x00\x00\x00WEBP"),
)


@dataclass(frozen=True)
class SeedObject:
    index: int
    key: str
    content_type: str
    body: bytes
    user_id: int


def seed_object(index: int, prefix: str, size: int) -> SeedObject:
    """Object ``index`` under ``prefix``: ``<prefix><shard>/<user id>/<hash>.<ext>``."""
    digest = hashlib.sha256(f"avatar-{index}".encode()).digest()
    h = digest.hex()
    ext, content_type, magic = _KINDS[index % len(_KINDS)]
    user_id = 100_000 + index
    key = f"{prefix}{h[:2]}/{user_id}/{h[2:14]}.{ext}"
    body = (magic + digest * (size // len(digest) + 1))[:size]
    return SeedObject(index, key, content_type, body, user_id)
