"""Key mapping and batching: pure functions, checked by example and by property."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from migrator.keys import batched, map_key, prefixes_overlap

# S3 keys are any UTF-8 text; surrogates cannot be encoded, so leave them out.
key_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
prefix_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)


# -- map_key -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "src", "dst", "expected"),
    [
        ("image/1/a.png", "image/", "avatar/", "avatar/1/a.png"),
        ("image/a", "image/", "", "a"),
        ("a/b.png", "", "avatar/", "avatar/a/b.png"),
        ("x", "", "", "x"),
        ("image/", "image/", "avatar/", "avatar/"),
        ("image/image/x", "image/", "avatar/", "avatar/image/x"),  # only the leading prefix
        ("image/ünï/日本.png", "image/", "avatar/", "avatar/ünï/日本.png"),
        ("imagefile.png", "image", "avatar", "avatarfile.png"),  # a plain string prefix
    ],
)
def test_map_key_replaces_the_prefix(key: str, src: str, dst: str, expected: str) -> None:
    assert map_key(key, src, dst) == expected


@pytest.mark.parametrize(
    ("key", "src"),
    [
        ("banner/1.png", "image/"),
        ("images/1.png", "image/"),  # look-alike prefix
        ("Image/1.png", "image/"),  # case matters
        ("imag", "image/"),
        ("", "image/"),
    ],
)
def test_map_key_refuses_keys_outside_the_prefix(key: str, src: str) -> None:
    with pytest.raises(ValueError, match="not under the source prefix") as info:
        map_key(key, src, "avatar/")
    assert repr(key) in str(info.value) and repr(src) in str(info.value)


@given(rest=key_text, src=prefix_text, dst=prefix_text)
def test_map_key_round_trips_by_swapping_prefixes(rest: str, src: str, dst: str) -> None:
    key = src + rest
    mapped = map_key(key, src, dst)
    assert mapped.startswith(dst)
    assert mapped == dst + rest
    assert map_key(mapped, dst, src) == key


@given(a=key_text, b=key_text, src=prefix_text, dst=prefix_text)
def test_map_key_is_injective_under_the_prefix(a: str, b: str, src: str, dst: str) -> None:
    assume(a != b)
    assert map_key(src + a, src, dst) != map_key(src + b, src, dst)


@given(key=key_text, src=prefix_text.filter(bool), dst=prefix_text)
def test_map_key_raises_exactly_when_key_is_outside(key: str, src: str, dst: str) -> None:
    if key.startswith(src):
        assert map_key(key, src, dst).startswith(dst)
    else:
        with pytest.raises(ValueError):
            map_key(key, src, dst)


# -- prefixes_overlap ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("image/", "avatar/", False),
        ("image/", "image/", True),
        ("image/", "image/avatar/", True),
        ("image/avatar/", "image/", True),
        ("", "avatar/", True),  # the whole bucket contains everything
        ("avatar/", "", True),
        ("", "", True),
        ("image", "images/", True),  # plain string prefixes: 'images/' starts with 'image'
        ("image/", "images/", False),
        ("a/", "b/a/", False),
    ],
)
def test_prefixes_overlap(a: str, b: str, overlap: bool) -> None:
    assert prefixes_overlap(a, b) is overlap


@given(a=prefix_text, b=prefix_text, rest=key_text)
def test_prefixes_overlap_iff_some_key_is_under_both(a: str, b: str, rest: str) -> None:
    assert prefixes_overlap(a, b) == prefixes_overlap(b, a)
    key = a + rest
    if key.startswith(b):  # a key listed under both prefixes means they overlap
        assert prefixes_overlap(a, b)
    if prefixes_overlap(a, b):  # and overlapping prefixes share a key: the longer prefix
        longest = max(a, b, key=len)
        assert longest.startswith(a) and longest.startswith(b)


# -- batched -------------------------------------------------------------------------------


def test_batched_1000_per_batch_order_kept() -> None:
    items = [f"image/{i:05d}.png" for i in range(2501)]
    batches = batched(items, 1000)
    assert [len(b) for b in batches] == [1000, 1000, 501]
    assert batches[0][0] == "image/00000.png"
    assert batches[1][0] == "image/01000.png"
    assert batches[2][-1] == "image/02500.png"


@pytest.mark.parametrize(
    ("n", "size", "lengths"),
    [
        (0, 1000, []),
        (1, 1000, [1]),
        (1000, 1000, [1000]),
        (1001, 1000, [1000, 1]),
        (5, 1, [1, 1, 1, 1, 1]),
        (5, 2, [2, 2, 1]),
    ],
)
def test_batched_lengths(n: int, size: int, lengths: list[int]) -> None:
    assert [len(b) for b in batched(list(range(n)), size)] == lengths


@pytest.mark.parametrize("size", [0, -1, -1000])
def test_batched_rejects_size_below_one(size: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        batched([1, 2, 3], size)


@given(items=st.lists(st.integers()), size=st.integers(min_value=1, max_value=1500))
def test_batched_concatenation_equals_input(items: list[int], size: int) -> None:
    batches = batched(items, size)
    assert [x for b in batches for x in b] == items
    assert all(1 <= len(b) <= size for b in batches)
    assert all(len(b) == size for b in batches[:-1])  # only the last one may be short
    assert len(batches) == -(-len(items) // size)
