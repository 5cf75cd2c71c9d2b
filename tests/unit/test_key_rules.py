"""The ``keys:`` rule: glob selection, the regex rewrite, and what plan refuses, as pure code."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from migrator.config import load_config
from migrator.errors import ConfigError
from migrator.keys import KeyRule, KeyRuleError, Skip, glob_to_regex, map_key
from migrator.plan import PlanTotals, plan_page

key_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
segment_text = st.text(alphabet="ab.-_ü", min_size=0, max_size=5)


def globbed(glob: str, key: str) -> bool:
    return re.fullmatch(glob_to_regex(glob), key, re.DOTALL) is not None


# -- globs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "key", "hit"),
    [
        ("image/*.png", "image/a.png", True),
        ("image/*.png", "image/tmp/a.png", False),  # * stays within one segment
        ("image/**/*.png", "image/a.png", True),  # ** is zero segments ...
        ("image/**/*.png", "image/1/2/a.png", True),  # ... or many
        ("image/**/*.png", "image/1/a.jpg", False),
        ("**/tmp/*", "tmp/x", True),
        ("**/tmp/*", "image/1/tmp/x", True),
        ("**/tmp/*", "image/1/tmp/x/y", False),
        ("**/tmp/**", "image/tmp/x/y", True),
        ("image/**", "image/a/b", True),
        ("*.png", "image/a.png", False),  # matched against the whole key
        ("image/?.png", "image/a.png", True),
        ("image/?.png", "image//.png", False),  # ? never matches /
        ("image/[0-9]*", "image/7x", True),
        ("image/[!0-9]*", "image/7x", False),
        ("image/[!0-9]*", "image/x7", True),
        ("image/[a/b]", "image//", False),  # a class never matches /
        ("image/[]]", "image/]", True),  # ] first in a class is a member
        ("image/[ab", "image/[ab", True),  # unclosed [ is literal
        ("image/a**b", "image/axyb", True),  # ** inside a segment is two *
        ("image/a**b", "image/a/b", False),
        ("image/(1)+.png", "image/(1)+.png", True),  # regex characters are literal
        ("image/(1)+.png", "image/11.png", False),
        ("image/*.png", "image/a.png\n", False),
    ],
)
def test_glob_semantics(glob: str, key: str, hit: bool) -> None:
    assert globbed(glob, key) is hit


@given(segment=segment_text, glob=st.text(alphabet="ab*?.", max_size=6))
def test_glob_without_slash_agrees_with_fnmatch_on_one_segment(segment: str, glob: str) -> None:
    """Within one path segment the syntax is fnmatch's (case-sensitive)."""
    assert globbed(glob, segment) == fnmatch.fnmatchcase(segment, glob)


@given(segments=st.lists(segment_text, max_size=5), name=segment_text)
def test_double_star_matches_any_depth(segments: list[str], name: str) -> None:
    key = "/".join(["image", *segments, name + ".png"])
    assert globbed("image/**/*.png", key)
    assert globbed("image/*.png", key) == (not segments)


# -- the rule ------------------------------------------------------------------------------

AVATARS = KeyRule(
    "image/",
    "avatar/",
    pattern=r"^image/(\d+)/(.*)$",
    replace=r"avatar/\1/\2",
    include=("image/**/*.png",),
    exclude=("**/tmp/*",),
)


@pytest.mark.parametrize(
    ("key", "outcome"),
    [
        ("image/1/a.png", "avatar/1/a.png"),
        ("image/12/x/y.png", "avatar/12/x/y.png"),
        ("image/1/tmp/a.png", Skip.EXCLUDED),  # exclude wins over include
        ("image/1/a.jpg", Skip.EXCLUDED),  # not included
        ("image/x/a.png", Skip.NOT_MATCHED),  # included, but the pattern does not match
        ("image/a.png", Skip.NOT_MATCHED),
    ],
)
def test_rule_selects_then_maps(key: str, outcome: str | Skip) -> None:
    assert AVATARS.map(key) == outcome


def test_pattern_must_match_the_whole_key() -> None:
    rule = KeyRule("image/", "avatar/", pattern=r"image/(\d+)", replace=r"avatar/\1")
    assert rule.map("image/12") == "avatar/12"
    assert rule.map("image/12/a.png") is Skip.NOT_MATCHED  # no silent partial match


def test_named_groups_and_unmatched_optional_group() -> None:
    rule = KeyRule(
        "image/",
        "avatar/",
        pattern=r"image/(?P<id>\d+)(/(?P<rest>.*))?",
        replace=r"avatar/\g<id>/\g<rest>",
    )
    assert rule.map("image/7/a.png") == "avatar/7/a.png"
    assert rule.map("image/7") == "avatar/7/"  # an unmatched group expands to ''


def test_filters_alone_keep_the_prefix_rewrite() -> None:
    rule = KeyRule("image/", "avatar/", exclude=("**/*.tmp",))
    assert rule.map("image/1/a.png") == "avatar/1/a.png"
    assert rule.map("image/1/a.tmp") is Skip.EXCLUDED


def test_destination_outside_the_prefix_is_refused_naming_the_key() -> None:
    rule = KeyRule("image/", "avatar/", pattern=r"image/(.*)", replace=r"\1")
    assert rule.map("image/avatar/x") == "avatar/x"
    with pytest.raises(
        KeyRuleError, match=re.escape("'image/1.png' to '1.png', outside destination")
    ):
        rule.map("image/1.png")


def test_destination_over_1024_bytes_is_refused_naming_the_key() -> None:
    rule = KeyRule("image/", "avatar/", pattern=r"image/(.*)", replace=r"avatar/\1\1")
    ok = "image/" + "é" * 254  # 508 bytes, doubled 1,016 + 7
    assert len(rule.map(ok).encode()) == 1023  # type: ignore[union-attr]
    long = "image/" + "é" * 255
    with pytest.raises(KeyRuleError, match="1,027 bytes, over S3's 1,024-byte limit") as info:
        rule.map(long)
    assert repr(long) in str(info.value)
    with pytest.raises(KeyRuleError, match="1,024-byte"):
        KeyRule("image/", "a" * 20 + "/").map("image/" + "x" * 1004)


@given(rest=key_text)
def test_no_rule_is_the_prefix_rewrite(rest: str) -> None:
    rule = KeyRule("image/", "avatar/")
    key = "image/" + rest
    expected = map_key(key, "image/", "avatar/")
    if len(expected.encode()) <= 1024:
        assert rule.map(key) == expected


@given(rest=key_text)
def test_mapping_is_deterministic(rest: str) -> None:
    key = "image/1/" + rest
    assert AVATARS.map(key) == AVATARS.map(key) == KeyRule(**_fields(AVATARS)).map(key)


def _fields(rule: KeyRule) -> dict[str, Any]:
    return {
        "source_prefix": rule.source_prefix,
        "dest_prefix": rule.dest_prefix,
        "pattern": rule.pattern,
        "replace": rule.replace,
        "include": rule.include,
        "exclude": rule.exclude,
    }


# -- plan_page -----------------------------------------------------------------------------


@dataclass
class Listed:
    key: str
    size: int = 1
    etag: str = "e"
    last_modified: datetime | None = None
    storage_class: str | None = None


def test_plan_page_counts_and_leaves_out() -> None:
    totals = PlanTotals()
    page = [Listed(k) for k in ("image/1/a.png", "image/1/tmp/b.png", "image/x/c.png")]
    planned, left_out = plan_page(AVATARS, page, totals)
    assert [(p.source_key, p.dest_key) for p in planned] == [("image/1/a.png", "avatar/1/a.png")]
    assert left_out == ["image/1/tmp/b.png", "image/x/c.png"]
    assert (totals.excluded, totals.not_matched) == (1, 1)


def test_plan_page_refuses_a_collision_naming_both_keys() -> None:
    rule = KeyRule("image/", "avatar/", pattern=r"image/0*(\d+)\.png", replace=r"avatar/\1.png")
    page = [Listed("image/007.png"), Listed("image/5.png"), Listed("image/7.png")]
    with pytest.raises(ConfigError) as info:
        plan_page(rule, page, PlanTotals())
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert "'image/007.png' and 'image/7.png' both map to 'avatar/7.png'" in message


# -- config.yaml ---------------------------------------------------------------------------


def config(tmp_path: Path, keys: Any) -> Path:
    data = {
        "job": "avatars",
        "source": {"bucket": "legacy", "prefix": "image/"},
        "destination": {"bucket": "production", "prefix": "avatar/"},
        "keys": keys,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_no_keys_section_is_the_prefix_rule(tmp_path: Path) -> None:
    path = config(tmp_path, {})
    assert load_config(path, env={}).key_rule == KeyRule("image/", "avatar/")


def test_keys_section_builds_the_rule(tmp_path: Path) -> None:
    keys = {
        "pattern": r"^image/(\d+)/(.*)$",
        "replace": r"avatar/\1/\2",
        "include": ["image/**/*.png"],
        "exclude": ["**/tmp/*"],
    }
    assert load_config(config(tmp_path, keys), env={}).key_rule == AVATARS


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        (
            {"pattern": r"image/(\d+", "replace": r"avatar/\1"},
            "keys.pattern: 'image/(\\\\d+' is not a Python regular expression: missing )",
        ),
        (
            {"pattern": r"image/(\d+)", "replace": r"avatar/\2"},
            "keys: replace 'avatar/\\\\2' does not fit pattern: invalid group reference 2",
        ),
        ({"pattern": r"image/(\d+)", "replace": r"avatar/\g<name>"}, "unknown group name 'name'"),
        ({"pattern": r"image/(\d+)", "replace": r"avatar/\d"}, "bad escape \\d"),
        ({"pattern": r"image/(\d+)"}, "keys: pattern and replace go together"),
        ({"replace": "avatar/x"}, "keys: pattern and replace go together"),
        ({"pattern": "", "replace": "avatar/"}, "keys.pattern: String should have at least 1"),
        (
            {"pattern": r"image/(\d+)", "replace": r"photo/\1"},
            "keys.replace 'photo/\\\\1' does not start with destination.prefix 'avatar/'",
        ),
        ({"include": [""]}, "keys.include: an empty glob matches no key"),
        ({"exclude": ["image/[z-a]"]}, "keys.exclude: 'image/[z-a]' is not a valid glob: bad"),
        ({"exclude": "**/tmp/*"}, "keys.exclude: Input should be a valid tuple"),
        ({"patern": "x"}, "keys.patern: unknown key (did you mean 'pattern'?)"),
    ],
)
def test_bad_keys_section_is_one_line(tmp_path: Path, keys: Any, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config(tmp_path, keys), env={})
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert says in message, message
