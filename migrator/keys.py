"""Key mapping from source to destination: pure functions, no I/O."""

from __future__ import annotations


def map_key(source_key: str, source_prefix: str, dest_prefix: str) -> str:
    """Destination key for ``source_key``: the source prefix replaced by the destination one.

    >>> map_key("image/1/a.png", "image/", "avatar/")
    'avatar/1/a.png'
    """
    if not source_key.startswith(source_prefix):
        raise ValueError(f"key {source_key!r} is not under the source prefix {source_prefix!r}")
    return dest_prefix + source_key[len(source_prefix) :]


def prefixes_overlap(a: str, b: str) -> bool:
    """True when one prefix contains the other, so listing one would see keys of the other."""
    return a.startswith(b) or b.startswith(a)


def batched(items: list, size: int) -> list[list]:
    """Split ``items`` into consecutive lists of at most ``size`` (e.g. 1,000 keys per delete)."""
    if size < 1:
        raise ValueError("size must be at least 1")
    return [items[i : i + size] for i in range(0, len(items), size)]
