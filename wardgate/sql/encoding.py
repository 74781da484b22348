"""The client encodings the gateway reads SQL in, decoded exactly as PostgreSQL converts them.

PostgreSQL converts every client message from the session's `client_encoding` to the server's
encoding before its scanner sees a byte. The gateway must read the same characters, or it classifies
a different statement: in SJIS, BIG5, GBK, GB18030, UHC, JOHAB and SHIFT_JIS_2004 the second byte of a
character can be `\\` or `'`, so `E'<0x81>\\'; DELETE FROM t; -- '` is one string to a UTF-8 reader and
a string, a DELETE and a comment to the server (the client-encoding injection of CVE-2006-2313).

So only encodings whose conversion Python reproduces byte for byte are read, on a UTF8 server:
- UTF8, and SQL_ASCII (on a UTF8 server PostgreSQL does not convert it, but still validates the
  bytes as UTF-8), both decoded as strict UTF-8;
- LATIN1, which maps each byte to the code point of the same number, as Python's latin-1 does.
Every other encoding is refused, by name, wherever a rule reads statements. A server whose own
encoding is not UTF8 is refused too: it folds the case of non-ASCII identifiers by its locale,
which the gateway's parser (UTF-8, no such folding) would not see.
"""

from __future__ import annotations

_CODECS = {"UTF8": "utf-8", "SQL_ASCII": "utf-8", "LATIN1": "latin-1"}
ACCEPTED = tuple(_CODECS)


def _canonical(name: str) -> str:
    # PostgreSQL reports its own names in ParameterStatus ("UTF8", "LATIN1"); requests may say "utf-8"
    return "".join(c for c in name.upper() if c.isalnum() or c == "_").replace("UTF_8", "UTF8") or "UTF8"


def refusal(client_encoding: str, server_encoding: str = "UTF8") -> str | None:
    """Why statements of a session with these encodings cannot be read as the server reads them, or None."""
    if _canonical(server_encoding) != "UTF8":
        return (f"the database's server_encoding is {server_encoding}; the gateway reads SQL as PostgreSQL does on "
                "a UTF8 database only")
    if _canonical(client_encoding) not in _CODECS:
        return (f"client_encoding {client_encoding} is not one the gateway can read exactly as PostgreSQL does; "
                f"use one of {', '.join(ACCEPTED)} (UTF8 is the default)")
    return None


def codec(client_encoding: str) -> str:
    """The Python codec that reads `client_encoding` as PostgreSQL converts it; ValueError if there is none."""
    try:
        return _CODECS[_canonical(client_encoding)]
    except KeyError:
        raise ValueError(refusal(client_encoding) or client_encoding) from None


def decode(raw: bytes, client_encoding: str) -> str:
    """`raw` as the server will read it. Strict: bytes the server would reject raise UnicodeDecodeError."""
    return raw.decode(codec(client_encoding))
