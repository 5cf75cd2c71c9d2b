"""Multipart planning without a server: part ranges, the 10,000-part limit, the ETag."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from migrator.storage.multipart import (
    GIB,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIB,
    TIB,
    multipart_etag,
    part_size_for,
    plan_parts,
)


def test_parts_cover_every_byte_once_in_order() -> None:
    parts = plan_parts(17 * MIB + 1, 5 * MIB)
    assert [p.number for p in parts] == [1, 2, 3, 4]
    assert parts[0].range == f"bytes=0-{5 * MIB - 1}"
    assert parts[-1].range == f"bytes={15 * MIB}-{17 * MIB}"
    assert all(b.first == a.last + 1 for a, b in itertools.pairwise(parts))


def test_exact_multiple_has_no_empty_last_part() -> None:
    parts = plan_parts(10 * MIB, 5 * MIB)
    assert len(parts) == 2 and parts[-1].last == 10 * MIB - 1


@pytest.mark.parametrize("size", [5 * GIB + 1, 1 * TIB, 5 * TIB])
def test_part_size_is_raised_to_fit_10000_parts(size: int) -> None:
    step = part_size_for(size, 64 * MIB)
    assert step % MIB == 0 and step <= MAX_PART_SIZE
    assert -(-size // step) <= MAX_PARTS
    assert part_size_for(size, MAX_PART_SIZE) == MAX_PART_SIZE  # big enough already


def test_five_tib_needs_525_mib_parts() -> None:
    assert part_size_for(5 * TIB, 5 * MIB) == 525 * MIB
    assert len(plan_parts(5 * TIB, 5 * MIB)) <= MAX_PARTS


def test_no_multipart_copy_of_nothing_or_too_much() -> None:
    with pytest.raises(ValueError):
        plan_parts(0, 5 * MIB)
    with pytest.raises(ValueError):
        plan_parts(5 * TIB + 1, 5 * MIB)


def test_multipart_etag_is_md5_of_part_md5s() -> None:
    a, b = hashlib.md5(b"a"), hashlib.md5(b"b")
    expected = hashlib.md5(a.digest() + b.digest()).hexdigest()
    assert multipart_etag([a.hexdigest(), f'"{b.hexdigest()}"']) == f"{expected}-2"
