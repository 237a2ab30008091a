"""RFC 9110 / 9111 header fields, read leniently: pure functions that never raise.

Where a directive's meaning is unclear they read it in the direction that caches
less: an unreadable ``max-age`` counts as 0, an unreadable ``Vary`` as ``*``.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Final, Literal, NamedTuple

__all__ = [
    "CacheControl",
    "EntityTag",
    "cache_control_for_private",
    "format_http_date",
    "if_none_match_matches",
    "parse_cache_control",
    "parse_entity_tag",
    "parse_http_date",
    "parse_if_none_match",
    "parse_vary",
]

_TCHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_DIGITS: Final = re.compile(r"[0-9]+")
_DELTA_MAX: Final = 2_147_483_648  # RFC 9111 §1.2.2: larger delta-seconds mean this
_OWS: Final = " \t"
_MAX_FIELD_CHARS: Final = 16 * 1024  # longer values are cut (servers cap headers far below this)


def _is_token(text: str) -> bool:
    return bool(text) and all(c in _TCHARS for c in text)


def _split_members(value: str, *, escapes: bool) -> list[str]:
    """Split a comma-separated field value, honouring double quotes (and backslash escapes)."""
    value = value[:_MAX_FIELD_CHARS]
    members: list[str] = []
    start, quoted, i, n = 0, False, 0, len(value)
    while i < n:
        c = value[i]
        if quoted:
            if escapes and c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ",":
            members.append(value[start:i])
            start = i + 1
        i += 1
    members.append(value[start:])
    return [m for m in (m.strip(_OWS) for m in members) if m]


def _unquote(raw: str) -> str:
    """The content of a quoted-string (lenient: a missing closing quote ends at the end)."""
    out: list[str] = []
    i, n = 1, len(raw)
    while i < n:
        c = raw[i]
        if c == "\\" and i + 1 < n:
            out.append(raw[i + 1])
            i += 2
            continue
        if c == '"':
            break
        out.append(c)
        i += 1
    return "".join(out)


def _delta_seconds(text: str | None) -> int | None:
    """delta-seconds, capped; None when *text* is not one."""
    if text is None or not _DIGITS.fullmatch(text):
        return None
    return _DELTA_MAX if len(text) > 10 else min(int(text), _DELTA_MAX)


class CacheControl(Mapping[str, "str | None"]):
    """Parsed ``Cache-Control`` directives: lower-case name -> argument (``None`` if bare).

    A directive repeated with two delta-seconds keeps the smaller one (RFC 9111
    §4.2.1 allows treating the conflict as stale; the smaller lifetime is the
    safe reading); any other repetition keeps the first.
    """

    __slots__ = ("_directives",)

    def __init__(self, directives: dict[str, str | None] | None = None) -> None:
        self._directives = directives or {}

    def __getitem__(self, name: str) -> str | None:
        return self._directives[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._directives)

    def __len__(self) -> int:
        return len(self._directives)

    def seconds(self, name: str) -> int | None:
        """The directive's delta-seconds; ``None`` when absent; 0 when malformed (safe: stale)."""
        if name not in self._directives:
            return None
        value = _delta_seconds(self._directives[name])
        return 0 if value is None else value

    def __repr__(self) -> str:
        return f"CacheControl({self._directives!r})"


def parse_cache_control(value: str | None) -> CacheControl:
    """Parse a ``Cache-Control`` field value (several lines joined with ``,``). Never raises."""
    directives: dict[str, str | None] = {}
    if not value:
        return CacheControl(directives)
    for member in _split_members(value, escapes=True):
        name, sep, raw = member.partition("=")
        name = name.strip(_OWS).lower()
        if not _is_token(name):
            continue
        arg: str | None = None
        if sep:
            raw = raw.strip(_OWS)
            arg = _unquote(raw) if raw.startswith('"') else raw
        if name not in directives:
            directives[name] = arg
            continue
        old, new = _delta_seconds(directives[name]), _delta_seconds(arg)
        if old is not None and new is not None and new < old:
            directives[name] = arg
    return CacheControl(directives)


def cache_control_for_private(value: str) -> str:
    """*value* turned into a private cache's header: ``private`` added, ``public`` and
    ``s-maxage`` (shared-cache directives) dropped, every other directive kept verbatim."""
    kept = []
    has_private = False
    for member in _split_members(value, escapes=True):
        name = member.partition("=")[0].strip(_OWS).lower()
        if name in ("public", "s-maxage"):
            continue
        has_private = has_private or name == "private"
        kept.append(member)
    if not has_private:
        kept.insert(0, "private")
    return ", ".join(kept)


class EntityTag(NamedTuple):
    """An entity tag: ``opaque`` keeps its double quotes (``'"abc"'``)."""

    weak: bool
    opaque: str

    def __str__(self) -> str:
        return ("W/" if self.weak else "") + self.opaque


def parse_entity_tag(value: str) -> EntityTag | None:
    """One entity tag (``"x"`` or ``W/"x"``), or ``None`` when *value* is not one. Never raises."""
    text = value.strip(_OWS)
    weak = text[:2] in ("W/", "w/")
    if weak:
        text = text[2:]
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"' and '"' not in text[1:-1]:
        return EntityTag(weak, text)
    return None


def parse_if_none_match(value: str) -> Literal["*"] | list[EntityTag]:
    """``*`` or the well-formed entity tags of an ``If-None-Match`` value. Never raises.

    Malformed members are skipped, and so is a ``*`` inside a list: both can
    only make a 304 less likely, never send one that the client did not ask for.
    """
    if value.strip(_OWS) == "*":
        return "*"
    tags = []
    for member in _split_members(value, escapes=False):
        tag = parse_entity_tag(member)
        if tag is not None:
            tags.append(tag)
    return tags


def if_none_match_matches(value: str, current: str) -> bool:
    """Does an ``If-None-Match`` value match the current ETag *current* (RFC 9110 §13.1.2)?

    Weak comparison: ``W/"x"`` matches ``"x"``. ``*`` matches any current
    representation. An unparsable *current* matches nothing but ``*``.
    """
    if value == current:
        return True
    parsed = parse_if_none_match(value)
    if parsed == "*":
        return True
    tag = parse_entity_tag(current)
    return tag is not None and any(t.opaque == tag.opaque for t in parsed)


def parse_vary(values: Iterable[str]) -> tuple[str, ...] | None:
    """Sorted, de-duplicated lower-case field names of ``Vary`` values; ``None`` for ``*``.

    A member that is not a field name also gives ``None``: a response that
    varies on something unreadable must not be stored. Never raises.
    """
    names: set[str] = set()
    for value in values:
        for member in value[:_MAX_FIELD_CHARS].split(","):
            name = member.strip(_OWS).lower()
            if not name:
                continue
            if name == "*" or not _is_token(name):
                return None
            names.add(name)
    return tuple(sorted(names))


def parse_http_date(value: str) -> int | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as epoch seconds, or ``None``. Never raises."""
    if not value or len(value) > 64:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        year, month, day, hour, minute, second = parsed[:6]
        dt.datetime(year, month, day, hour, minute, min(second, 59))  # out of range: ValueError
        return int(email.utils.mktime_tz(parsed))
    except Exception:  # the stdlib parser raises several types on odd input
        return None


def format_http_date(epoch_seconds: float) -> str:
    """An IMF-fixdate: ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return email.utils.formatdate(epoch_seconds, usegmt=True)
