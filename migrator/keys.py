"""Key mapping from source to destination: pure functions, no I/O."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


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


S3_MAX_KEY_BYTES = 1024  # S3 refuses longer keys (UTF-8 bytes)


class Skip(enum.Enum):
    """Why a listed key is not planned."""

    EXCLUDED = "excluded"  # left out by keys.include / keys.exclude
    NOT_MATCHED = "not matched"  # keys.pattern does not match it


class KeyRuleError(ValueError):
    """A key the rule cannot map: the message is one line naming the key."""


def glob_to_regex(glob: str) -> str:
    """A regular expression that matches exactly the keys ``glob`` matches.

    The syntax of shell globs with ``**`` (as ``glob.glob(recursive=True)`` and git's
    pathspecs): ``*`` is any run of characters except ``/``, ``?`` one character except
    ``/``, ``[abc]``/``[a-z]``/``[!abc]`` one character (never ``/``) of a set, and a path
    segment that is exactly ``**`` matches zero or more whole segments. Everything else is
    literal. ``fnmatch`` is not used: its ``*`` crosses ``/``, so ``image/*.png`` would select
    ``image/tmp/x.png`` too.

    >>> bool(re.fullmatch(glob_to_regex("image/**/*.png"), "image/a.png"))
    True
    >>> bool(re.fullmatch(glob_to_regex("image/*.png"), "image/tmp/a.png"))
    False
    """
    segments = glob.split("/")
    out: list[str] = []
    for n, segment in enumerate(segments):
        last = n == len(segments) - 1
        if segment == "**":
            out.append(".*" if last else "(?:.*/)?")
            continue
        out.append(_segment_to_regex(segment) + ("" if last else "/"))
    return "".join(out)


def _segment_to_regex(segment: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        c = segment[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := _class_end(segment, i)) is not None:
            body = segment[i:end]
            negate = body[:1] == "!"
            body = body[1:] if negate else body
            inner = "".join("\\" + ch if ch in "\\^[]" else ch for ch in body)
            out.append(f"[^/{inner}]" if negate else f"(?!/)[{inner}]")
            i = end + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


def _class_end(segment: str, start: int) -> int | None:
    """Index of the ``]`` closing a class opened before ``start`` (a ``]`` right after ``[``
    or ``[!`` is a member, as in fnmatch); None when unclosed (then ``[`` is literal)."""
    i = start + (1 if segment[start : start + 1] == "!" else 0)
    i += 1 if segment[i : i + 1] == "]" else 0
    end = segment.find("]", i)
    return None if end == -1 else end


@dataclass(frozen=True)
class KeyRule:
    """Which listed keys a job plans, and the destination key of each.

    Keys are selected by ``include`` (any of them, when given) and ``exclude`` (none of
    them), globs matched against the whole source key. A selected key is then mapped: with no
    ``pattern``, by the prefix rewrite (``map_key``); with one, ``pattern`` must match the
    whole source key (``re.fullmatch``) and ``replace``, expanded with its groups as
    ``re.sub`` does, is the whole destination key. It must start with the destination prefix
    (the overlap check, the audit and ``migrator verify`` only look there) and fit S3's
    1,024 bytes. Pure and deterministic: a re-plan maps every key the same way.
    """

    source_prefix: str
    dest_prefix: str
    pattern: str | None = None
    replace: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)
    _include: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)
    _exclude: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        def union(globs: tuple[str, ...]) -> re.Pattern[str] | None:
            if not globs:
                return None
            return re.compile("|".join(f"(?:{glob_to_regex(g)})" for g in globs), re.DOTALL)

        compiled = re.compile(self.pattern, re.DOTALL) if self.pattern is not None else None
        object.__setattr__(self, "_pattern", compiled)
        object.__setattr__(self, "_include", union(self.include))
        object.__setattr__(self, "_exclude", union(self.exclude))

    def map(self, source_key: str) -> str | Skip:
        """The destination key of ``source_key``, or why it is not planned."""
        if self._include is not None and not self._include.fullmatch(source_key):
            return Skip.EXCLUDED
        if self._exclude is not None and self._exclude.fullmatch(source_key):
            return Skip.EXCLUDED
        if self._pattern is None:
            dest = map_key(source_key, self.source_prefix, self.dest_prefix)
        else:
            match = self._pattern.fullmatch(source_key)
            if match is None:
                return Skip.NOT_MATCHED
            dest = match.expand(self.replace or "")
            if not dest.startswith(self.dest_prefix):
                raise KeyRuleError(
                    f"keys.replace maps {source_key!r} to {dest!r}, outside destination.prefix "
                    f"{self.dest_prefix!r}; make keys.replace start with the destination prefix"
                )
        size = len(dest.encode("utf-8"))
        if size > S3_MAX_KEY_BYTES:
            raise KeyRuleError(
                f"destination key for {source_key!r} is {size:,} bytes, over S3's "
                f"{S3_MAX_KEY_BYTES:,}-byte limit; shorten it with keys.pattern/keys.replace "
                "or a shorter destination.prefix"
            )
        return dest
