"""Throughput of the content detectors (wardgate.masking.detectors, all six kinds through `find`) on this
machine, in MiB/s of CPU time, for four ways to run them over adversarial and ordinary inputs of 64 KiB
and 1 MiB:

- re (before): the backtracking patterns of Python's `re` that the detectors ran on before google-re2;
- google-re2: wardgate.masking.detectors as it is;
- hyperscan: the same patterns, every match reported, then the leftmost of each start kept (its Unicode
  classes make the patterns too large for hyperscan, so \\d and \\w are ASCII here); skipped when the
  hyperscan module is not installed;
- hand: scanners written in Python (email, card and ssn by hand; phone, iban and ip on the `re`
  patterns, whose repetitions are all bounded).

Where `re` (before) took more than QUADRATIC_SECONDS at 64 KiB, its 1 MiB figure is extrapolated as the
square of the length (marked ~) instead of measured: it would run for minutes.

Usage: .venv/bin/python bench/detectors.py
"""

from __future__ import annotations

import ipaddress
import re
import time
from bisect import bisect_left
from collections.abc import Callable
from functools import lru_cache

from wardgate.masking import detectors as now

try:
    import hyperscan
except ImportError:  # measurement only: not a dependency
    hyperscan = None

QUADRATIC_SECONDS = 0.25
SIZES = (64 << 10, 1 << 20)
Spans = list[tuple[int, int, str]]

ORDINARY = ("Dear customer, thank you for your order of 3 items (order 88213, placed on 2024-03-18). "
            "Your parcel left our warehouse this morning and should arrive within two working days. "
            "If anything is wrong with it, reply to this message or write to support.team@shop.example "
            "and quote the order number. We are open Monday to Friday, 9:00 to 17:30. ")


def _repeat(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


INPUTS: dict[str, Callable[[int], str]] = {
    "a…a@a…a": lambda n: "a" * (n // 2) + "@" + "a" * (n - n // 2 - 1),
    "@a…a": lambda n: "@" + "a" * (n - 1),
    "a.a.…@a.a.…": lambda n: _repeat("a.", n // 2) + "@" + _repeat("a.", n - n // 2 - 1),
    "digits 1111…": lambda n: "1" * n,
    "1-2-3-…": lambda n: _repeat("1-", n),
    "1.2.3.…": lambda n: _repeat("1.", n),
    "1:2:3:…": lambda n: _repeat("1:", n),
    "' :: ' (dense ip)": lambda n: _repeat(" :: ", n),
    "cards 4111 1111…": lambda n: _repeat("4111 1111 1111 1111 ", n),
    "1 KiB text + email": lambda n: _repeat(ORDINARY[:1024].ljust(1024), n),
}


# re (before) -----------------------------------------------------------------------------------------

def _luhn_sep(v: str) -> bool:
    return now.luhn_ok(v.replace(" ", "").replace("-", ""))


def _iban_sep(v: str) -> bool:
    return now.iban_ok(v.replace(" ", ""))


def _ip_ok(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


BEFORE: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None]] = {
    "email": (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"), None),
    "card": (re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)"), _luhn_sep),
    "ssn": (re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)"), None),
    "phone": (re.compile(r"(?<![\w.+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,3}"
                         r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w.])"), None),
    "iban": (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), _iban_sep),
    "ip": (re.compile(r"(?<![\w.:])(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})(?![\w.:])"),
           _ip_ok),
}


def find_before(text: str, raw: bytes) -> Spans:
    accepted: Spans = []
    for kind in now.PRIORITY:
        if not now.DETECTORS[kind].prefilter(raw):
            continue
        pattern, check = BEFORE[kind]
        for m in pattern.finditer(text):
            s, e = m.span()
            if (check is None or check(m.group(0))) and all(e <= a or s >= b for a, b, _ in accepted):
                accepted.append((s, e, kind))
    accepted.sort()
    return accepted


def _merge(text: str, raw: bytes, spans_of: Callable[[str], list[tuple[int, int]]]) -> Spans:
    """find()'s priority merge over another engine's spans per kind."""
    accepted: Spans = []
    for kind in now.PRIORITY:
        if not now.DETECTORS[kind].prefilter(raw):
            continue
        spans = spans_of(kind)
        if accepted:
            starts = [a for a, _, _ in accepted]
            ends = [b for _, b, _ in accepted]
            new = [(s, e, kind) for s, e in spans if not ((i := bisect_left(starts, e)) and ends[i - 1] > s)]
            accepted = sorted(accepted + new)
        else:
            accepted = [(s, e, kind) for s, e in spans]
    return accepted


# hand ------------------------------------------------------------------------------------------------

_LOCAL_RUN = re.compile(r"[A-Za-z0-9._%+-]*")
_DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")  # labels cannot hold a dot: no backtracking to speak of
_CHAIN = re.compile(r"\d+(?:[ -]\d+)*")
_SSN_CHAIN = re.compile(r"\d+(?:-\d+)*")
_DIGITS = re.compile(r"\d+")


def hand_email(text: str) -> list[tuple[int, int]]:
    # A match starts at the run of local-part characters before an "@" (none of them is an "@") and
    # takes the longest domain after it.
    out: list[tuple[int, int]] = []
    rev, n, pos = text[::-1], len(text), 0
    at = text.find("@")
    while at >= 0:
        start = max(pos, at - len(_LOCAL_RUN.match(rev, n - at).group()))
        domain = _DOMAIN.match(text, at + 1) if start < at else None
        if domain:
            out.append((start, domain.end()))
            pos = domain.end()
            at = text.find("@", pos)
        else:
            at = text.find("@", at + 1)
    return out


def hand_card(text: str) -> list[tuple[int, int]]:
    # In a chain of digit groups joined by single separators, a card starts at a group and ends at the
    # furthest group that keeps it within 13 to 19 digits.
    out: list[tuple[int, int]] = []
    for chain in _CHAIN.finditer(text):
        groups = [g.span() for g in _DIGITS.finditer(text, chain.start(), chain.end())]
        i = 0
        while i < len(groups):
            total, j, best = 0, i, -1
            while j < len(groups) and total + groups[j][1] - groups[j][0] <= 19:
                total += groups[j][1] - groups[j][0]
                if total >= 13:
                    best = j
                j += 1
            if best < 0:
                i += 1
                continue
            s, e = groups[i][0], groups[best][1]
            if _luhn_sep(text[s:e]):
                out.append((s, e))
            i = best + 1
    return out


def hand_ssn(text: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for chain in _SSN_CHAIN.finditer(text):
        if chain.end() - chain.start() < 11:
            continue
        groups = [g.span() for g in _DIGITS.finditer(text, chain.start(), chain.end())]
        i = 0
        while i + 2 < len(groups):
            if [e - s for s, e in groups[i:i + 3]] == [3, 2, 4]:
                out.append((groups[i][0], groups[i + 2][1]))
                i += 3
            else:
                i += 1
    return out


@lru_cache(maxsize=4096)
def _ip_cached(candidate: str) -> bool:
    return _ip_ok(candidate)


def _by_re(kind: str, check: Callable[[str], bool] | None) -> Callable[[str], list[tuple[int, int]]]:
    pattern = BEFORE[kind][0]
    return lambda text: [m.span() for m in pattern.finditer(text) if check is None or check(m.group(0))]


HAND: dict[str, Callable[[str], list[tuple[int, int]]]] = {
    "email": hand_email, "card": hand_card, "ssn": hand_ssn, "phone": _by_re("phone", None),
    "iban": _by_re("iban", _iban_sep), "ip": _by_re("ip", _ip_cached),
}


def find_hand(text: str, raw: bytes) -> Spans:
    return _merge(text, raw, lambda kind: HAND[kind](text))


# hyperscan -------------------------------------------------------------------------------------------

def _hyperscan_database():  # noqa: ANN202
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    kinds = list(now.PRIORITY)
    sources = [now.DETECTORS[k]._source().replace(r"\p{Nd}", r"\d").replace(r"\p{L}\p{N}_", r"\w") for k in kinds]
    db.compile(expressions=[s.encode() for s in sources], ids=list(range(len(kinds))), elements=len(kinds),
               flags=[hyperscan.HS_FLAG_SOM_LEFTMOST] * len(kinds))
    return db, kinds


def find_hyperscan(db_kinds, text: str, raw: bytes) -> Spans:  # noqa: ANN001
    db, kinds = db_kinds
    framed = b"\x00" + text.encode() + b"\x00"  # as the detectors search: the boundaries are consumed
    hits: list[list[tuple[int, int]]] = [[] for _ in kinds]

    def on_match(ident: int, start: int, end: int, flags: int, context: object) -> None:
        hits[ident].append((start, end))

    db.scan(framed, match_event_handler=on_match)

    def spans_of(kind: str) -> list[tuple[int, int]]:
        # Every (leftmost start, end) is reported: keep the leftmost start with its furthest end, then the
        # next one starting where that match ended (an ASCII text's bytes are its characters).
        consumed = 1 if kind != "email" else 0  # the boundary characters either side
        check = now.DETECTORS[kind].check
        out: list[tuple[int, int]] = []
        allowed = 0
        for start, end in sorted(hits[kinds.index(kind)], key=lambda h: (h[0], -h[1])):
            if start < allowed:
                continue
            s, e = start + consumed - 1, end - consumed - 1  # without the leading NUL
            if check is None or check(text[s:e]):
                out.append((s, e))
            allowed = end - consumed
        return out

    return _merge(text, raw, spans_of)


# measuring -------------------------------------------------------------------------------------------

def _cpu(engine: Callable[[str, bytes], Spans], text: str, raw: bytes) -> tuple[float, Spans]:
    start = time.thread_time()
    spans = engine(text, raw)
    return time.thread_time() - start, spans


def main() -> None:
    engines: dict[str, Callable[[str, bytes], Spans]] = {
        "re (before)": find_before,
        "google-re2": lambda text, raw: now.find(text, raw, now.ALL_KINDS),
    }
    if hyperscan is not None:
        db_kinds = _hyperscan_database()
        engines["hyperscan"] = lambda text, raw: find_hyperscan(db_kinds, text, raw)
    else:
        print("hyperscan is not installed: skipped")
    engines["hand"] = find_hand
    print(f"{'input':24} {'size':>6}  " + "  ".join(f"{n:>12}" for n in engines) + "   spans")
    quadratic: dict[str, float] = {}
    for label, make in INPUTS.items():
        for size in SIZES:
            text = make(size)
            raw = text.encode()
            mib = len(raw) / (1 << 20)
            expected = now.find(text, raw, now.ALL_KINDS)
            cells = []
            for name, engine in engines.items():
                if name == "re (before)" and label in quadratic:
                    cells.append(f"~{mib / (quadratic[label] * (size / SIZES[0]) ** 2):10.3g} ")
                    continue
                seconds, spans = _cpu(engine, text, raw)
                if name == "re (before)" and size == SIZES[0] and seconds > QUADRATIC_SECONDS:
                    quadratic[label] = seconds
                cells.append(f"{mib / seconds:11.3g}" + (" " if spans == expected else "!"))
            print(f"{label:24} {size >> 10:5}K  " + "  ".join(cells) + f"   {len(expected)}", flush=True)
    print("MiB/s of CPU time (time.thread_time). ~: extrapolated from 64 KiB as the square of the length.")
    print("!: spans differ from google-re2's (hyperscan keeps the leftmost-longest match, not the leftmost-first).")


if __name__ == "__main__":
    main()
