"""PII detectors over text, each with a C-speed pre-filter before any regular expression runs,
and checksums where the kind has one (Luhn for cards, mod-97 for IBANs).

Matching is RE2's (google-re2), whose time is linear in the text for any pattern and any input: under a
backtracking engine the email pattern took the square of the length (`'@' || repeat('a', 60000)` held
the gateway for 16 s), and a configured pattern could take far worse. What is done in Python is bounded
per span: every built-in span has a bounded length but the email's, which has no check.

RE2 has no lookaround. Where a span's neighbours matter (no digit just before or just after a card
number), the program consumes one character on each side of the span, one the lookaround would have let
pass, and the text is searched with a NUL before and after it, which passes as its start and its end do
(a NUL is none of the characters a boundary refuses). Each search starts where the previous span ended,
as the character after one span may be the one before the next. That no span starts right where the
previous one ended is as before: each span ends with a character its own detector refuses before one.

Digits and word characters are Unicode's, as Python's `\\d` and `\\w` are (RE2's are ASCII): `\\p{Nd}`
and `[\\p{L}\\p{N}_]`, from RE2's tables (which know the characters Unicode assigned after Python
3.11's 14.0 as well).
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache

import re2
from re2 import _re2

_UNANCHORED = _re2.RE2.Anchor.UNANCHORED


def luhn_ok(digits: str) -> bool:
    if digits.isascii() and digits.isdigit():
        # The same sum as below, in C: every second digit from the right doubled (less 9 past 9).
        b = digits.encode()[::-1]
        return (sum(b[::2]) + sum(b[1::2].translate(_DOUBLED)) - 48 * len(b)) % 10 == 0
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")
_BASE36 = str.maketrans({chr(c): str(c - 55) for c in range(65, 91)} | {chr(c): str(c - 87) for c in range(97, 123)})


def iban_ok(candidate: str) -> bool:
    s = candidate[4:] + candidate[:4]
    if s.isascii() and s.isalnum():
        return int(s.translate(_BASE36)) % 97 == 1  # each letter as its base-36 value, as below
    try:
        return int("".join(str(int(c, 36)) for c in s)) % 97 == 1
    except ValueError:
        return False


@lru_cache(maxsize=4096)  # dense input repeats its candidates ("::" again and again), each at most 39 characters
def _ip_ok(candidate: str) -> bool:
    # A candidate of the IPv6 branch has a colon, one of the IPv4 branch none: the parser ip_address would end
    # up with, without first failing (an exception) at the other.
    try:
        if ":" in candidate:
            ipaddress.IPv6Address(candidate)
        else:
            ipaddress.IPv4Address(candidate)
    except ValueError:
        return False
    return True


def _program(pattern: str, name: str) -> Callable[..., list[tuple[int, int]]]:
    options = re2.Options()
    options.log_errors = False
    options.never_capture = True  # only the whole span is wanted, which RE2 finds without its slower engines
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"pattern {name!r} is not a valid RE2 regular expression ({detail}): RE2 syntax is required, "
                         "since patterns are matched in time linear in the text, which rules out backreferences "
                         "and lookaround ((?=...), (?!...), (?<=...), (?<!...))") from exc
    # The binding's own Match, which gives the spans without a match object per hit: a third of the cost
    # where matches are dense (google-re2 is pinned in pyproject.toml).
    return compiled._regexp.Match


def _char_len(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


class _Subject:
    """A text as RE2 reads it (UTF-8), once for all the detectors that look at it."""

    __slots__ = ("text", "data", "ascii", "_framed")

    def __init__(self, text: str) -> None:
        try:
            data = text.encode()
        except UnicodeEncodeError:
            # A lone surrogate becomes "?": one character still, and no more a digit or a word character.
            data = text.encode("utf-8", "replace")
        self.text, self.data, self.ascii = text, data, len(data) == len(text)
        self._framed: bytes | None = None

    @property
    def framed(self) -> bytes:
        if self._framed is None:
            self._framed = b"\x00" + self.data + b"\x00"
        return self._framed

    def kept(self, found: list[tuple[int, int]], check: Callable[[str], bool] | None) -> list[tuple[int, int]]:
        """Byte spans of `data` (in order, not overlapping) as character spans of `text`, where `check` accepts them."""
        if not self.ascii:
            data, chars, byte, char = self.data, [], 0, 0
            for s, e in found:
                start = char = char + len(data[byte:s].decode())
                char += len(data[s:e].decode())
                byte = e
                chars.append((start, char))
            found = chars
        if check is None:
            return found
        text = self.text
        return [(s, e) for s, e in found if check(text[s:e])]


# Candidates one detector may meet in one value. Each costs work in Python (a check, a span, a
# replacement), so past this many the value is not searched to its end: find raises TooManyMatches, and
# the caller masks the value whole. A value that dense with what detectors look for is no text to keep.
MAX_MATCHES = 256


class TooManyMatches(Exception):
    """A detector met more than MAX_MATCHES candidates in one value."""


@dataclass(frozen=True)
class Detector:
    """Spans of `pattern` (RE2 syntax) in a text whose UTF-8 bytes pass `prefilter`, where `check` accepts their text."""

    kind: str
    prefilter: Callable[[bytes], bool]
    pattern: str
    check: Callable[[str], bool] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_match", _program(self._source(), self.kind))

    def __reduce__(self) -> tuple:
        # Pickled by its fields and compiled again where it is loaded (the configuration travels to the
        # recorder's process): a compiled RE2 program cannot be pickled.
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))

    def _source(self) -> str:
        return self.pattern

    def spans(self, text: str) -> list[tuple[int, int]]:
        return self._spans(_Subject(text))

    def _spans(self, subject: _Subject) -> list[tuple[int, int]]:
        match, data = self._match, subject.data  # type: ignore[attr-defined]
        found, pos, end = [], 0, len(data)
        while True:
            [(s, e)] = match(_UNANCHORED, data, pos, end)
            if s < 0:
                break
            if len(found) == MAX_MATCHES:
                raise TooManyMatches
            found.append((s, e))
            if e > s:
                pos = e
            elif e == end:
                break
            else:
                pos = e + _char_len(data[e])  # past an empty match by a whole character
        return subject.kept(found, self.check)


@dataclass(frozen=True)
class _Bounded(Detector):
    """A detector whose span must not be preceded by a character of `not_after` nor followed by one of
    `not_before` (contents of RE2 character classes), as a lookbehind and a lookahead would say."""

    not_after: str = ""
    not_before: str = ""

    def _source(self) -> str:
        return f"[^{self.not_after}](?:{self.pattern})[^{self.not_before}]"

    def _spans(self, subject: _Subject) -> list[tuple[int, int]]:
        match, framed, ascii = self._match, subject.framed, subject.ascii  # type: ignore[attr-defined]
        found, pos, end, check, met = [], 0, len(framed), self.check, 0
        # The span is what lies between the two consumed characters; the next search starts at the second.
        if ascii:  # a character a byte: the span is the match less a byte each side (less one more for the NUL)
            text = subject.text
            while True:
                [(t, u)] = match(_UNANCHORED, framed, pos, end)
                if t < 0:
                    return found
                met += 1
                if met > MAX_MATCHES:
                    raise TooManyMatches
                pos = u - 1
                if check is None or check(text[t:u - 2]):
                    found.append((t, u - 2))
        while True:
            [(t, u)] = match(_UNANCHORED, framed, pos, end)
            if t < 0:
                break
            if len(found) == MAX_MATCHES:
                raise TooManyMatches
            s, pos = t + _char_len(framed[t]), u - 1
            while framed[pos] & 0xC0 == 0x80:
                pos -= 1
            found.append((s - 1, pos - 1))
        return subject.kept(found, check)


def _count_digits(raw: bytes) -> int:
    return len(raw) - len(raw.translate(None, b"0123456789"))


_D = r"\p{Nd}"  # Python's \d
_W = r"\p{L}\p{N}_"  # Python's \w, inside a class

DETECTORS: dict[str, Detector] = {
    "email": Detector("email", lambda raw: b"@" in raw,
                      r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"),
    "card": _Bounded("card", lambda raw: _count_digits(raw) >= 13,
                     rf"(?:{_D}[ -]?){{12,18}}{_D}",
                     lambda v: luhn_ok(v.replace(" ", "").replace("-", "")), _D, _D),
    "ssn": _Bounded("ssn", lambda raw: b"-" in raw and _count_digits(raw) >= 9,
                    rf"{_D}{{3}}-{_D}{{2}}-{_D}{{4}}", None, _D, _D),
    "phone": _Bounded("phone", lambda raw: _count_digits(raw) >= 7,
                      # international (+…), an area code in parentheses, or North American 555-123-4567
                      rf"\+{_D}{{1,3}}[ .-]?(?:\({_D}{{1,4}}\)[ .-]?)?{_D}{{1,4}}(?:[ .-]{_D}{{2,4}}){{1,3}}"
                      rf"|\({_D}{{2,4}}\)[ .-]?{_D}{{3,4}}[ .-]?{_D}{{3,4}}|{_D}{{3}}[.-]{_D}{{3}}[.-]{_D}{{4}}",
                      None, _W + ".+", _W + "."),
    # \b on both sides: the span starts and ends with a word character
    "iban": _Bounded("iban", lambda raw: _count_digits(raw) >= 10,
                     rf"[A-Z]{{2}}{_D}{{2}}(?: ?[A-Z0-9]{{4}}){{2,7}}(?: ?[A-Z0-9]{{1,4}})?",
                     lambda v: iban_ok(v.replace(" ", "")), _W, _W),
    "ip": _Bounded("ip", lambda raw: raw.count(b".") >= 3 or raw.count(b":") >= 2,
                   rf"(?:{_D}{{1,3}}\.){{3}}{_D}{{1,3}}|[0-9A-Fa-f]{{0,4}}(?::[0-9A-Fa-f]{{0,4}}){{2,7}}",
                   _ip_ok, _W + ".:", _W + ".:"),
}
ALL_KINDS = tuple(DETECTORS)


# The most specific kinds claim a span first; phone numbers, the loosest pattern, come last.
PRIORITY = ("card", "iban", "ssn", "email", "ip", "phone")


def _always(raw: bytes) -> bool:
    return True


def custom(name: str, pattern: str) -> Detector:
    """A detector from a configured regular expression, in RE2 syntax (no pre-filter: it always runs)."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern {name!r} is not a string")
    return Detector(name, _always, pattern)


@lru_cache(maxsize=64)
def _in_priority(kinds: tuple[str, ...]) -> tuple[Detector, ...]:
    return tuple(DETECTORS[k] for k in PRIORITY if k in kinds)


def find(text: str, raw: bytes, kinds: tuple[str, ...], extra: tuple[Detector, ...] = ()) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans of PII in `text`, in order. Where spans overlap, the
    detector first in PRIORITY keeps its own (then the configured patterns, in their order). Raises
    TooManyMatches when a detector meets more than MAX_MATCHES candidates."""
    accepted: list[tuple[int, int, str]] = []
    subject = None
    for det in _in_priority(kinds) + tuple(extra):
        if not det.prefilter(raw):
            continue
        if subject is None:
            subject = _Subject(text)
        spans = det._spans(subject)
        if not spans:
            continue
        kind = det.kind
        if accepted:
            # Sorted and not overlapping, the accepted spans' ends rise with their starts: of those that
            # start before a new span ends, the last reaches furthest.
            starts = [a for a, _, _ in accepted]
            ends = [b for _, b, _ in accepted]
            new = [(s, e, kind) for s, e in spans if not ((i := bisect_left(starts, e)) and ends[i - 1] > s)]
            accepted = sorted(accepted + new)  # two sorted runs: merged in linear time
        else:
            accepted = [(s, e, kind) for s, e in spans]
    return accepted
