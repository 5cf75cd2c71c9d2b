"""S3's multipart limits and the pure planning of a multipart copy: part ranges and the ETag
the completed object must have.

Planning is kept apart from the requests (``storage/s3.py``) so the arithmetic that decides
which bytes go where is tested without a server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

MIB = 1024 * 1024
GIB = 1024 * MIB
TIB = 1024 * GIB

MIN_PART_SIZE = 5 * MIB  # every part but the last (EntityTooSmall otherwise)
MAX_PART_SIZE = 5 * GIB
MAX_PARTS = 10_000
MAX_SINGLE_COPY = 5 * GIB  # the largest source one CopyObject accepts
MAX_OBJECT_SIZE = 5 * TIB


@dataclass(frozen=True)
class Part:
    """One ``UploadPartCopy``: part ``number`` (from 1) holds source bytes ``first``..``last``
    (inclusive, as in an HTTP range)."""

    number: int
    first: int
    last: int

    @property
    def range(self) -> str:
        return f"bytes={self.first}-{self.last}"


def part_size_for(size: int, part_size: int) -> int:
    """``part_size``, raised to a whole number of MiB when the object would need more than
    10,000 parts at that size (a 5 TiB object needs 525 MiB parts)."""
    needed = -(-size // MAX_PARTS)
    if needed <= part_size:
        return part_size
    return -(-needed // MIB) * MIB


def plan_parts(size: int, part_size: int) -> list[Part]:
    """The parts covering ``size`` bytes, each ``part_size`` bytes (raised if need be) but the
    last. A zero-byte object has no ranges to copy and must not come here."""
    if size <= 0:
        raise ValueError("a multipart copy needs at least one byte")
    if size > MAX_OBJECT_SIZE:
        raise ValueError(f"{size} bytes is larger than S3's largest object (5 TiB)")
    step = part_size_for(size, part_size)
    return [
        Part(i + 1, first, min(first + step, size) - 1)
        for i, first in enumerate(range(0, size, step))
    ]


def multipart_etag(part_etags: Sequence[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags: the MD5 of the
    concatenated binary part MD5s, then ``-`` and the number of parts."""
    digest = hashlib.md5(b"".join(bytes.fromhex(e.strip('"')) for e in part_etags))
    return f"{digest.hexdigest()}-{len(part_etags)}"
