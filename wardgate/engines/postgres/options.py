"""The settings a client's startup packet would apply, read exactly as PostgreSQL reads them, and the
gateway's check that each one is on a short list of harmless session settings."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ...sql.classify import ROLE_SETTINGS


class OptionsError(ValueError):
    """The `options` string is one PostgreSQL would refuse to start a session with."""


# C's isspace() in the locales a server runs in: pg_split_opts uses it, and Python's str.isspace() is
# wider (it counts \x1c-\x1f and Unicode spaces), which would split words the server keeps whole.
_SPACE = frozenset(" \t\n\v\f\r")

# The option string process_postgres_switches (src/backend/tcop/postgres.c) gives getopt(); a letter
# followed by ':' takes an argument. '-' is an option letter too: `--name=value` is `-` with the
# argument `name=value` (plain getopt has no long options).
_OPTSTRING = "B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:"
_TAKES_ARG = frozenset(_OPTSTRING[i] for i in range(len(_OPTSTRING) - 1) if _OPTSTRING[i + 1] == ":")
_LETTERS = frozenset(_OPTSTRING) - {":"}

# Switches that set one setting to a fixed value, or to their argument (None).
_FIXED = {
    "B": ("shared_buffers", None),
    "e": ("datestyle", "euro"),
    "F": ("fsync", "false"),
    "h": ("listen_addresses", None),
    "i": ("listen_addresses", "*"),
    "k": ("unix_socket_directories", None),
    "l": ("ssl", "true"),
    "N": ("max_connections", None),
    "O": ("allow_system_table_mods", "true"),
    "P": ("ignore_system_indexes", "true"),
    "p": ("port", None),
    "S": ("work_mem", None),
    "s": ("log_statement_stats", "true"),
    "W": ("post_auth_delay", None),
}
# Switches that act only on the server's own command line ("secure" options) or not at all: from a
# client they set nothing, and -C, -D, -r and -v still take an argument.
_INERT = frozenset("bCDEjnrTv")

# set_plan_disabling_options: `-f x` turns one plan type off, by the argument's first letter.
_PLAN_TYPES = {
    "s": "enable_seqscan", "i": "enable_indexscan", "o": "enable_indexonlyscan", "b": "enable_bitmapscan",
    "t": "enable_tidscan", "n": "enable_nestloop", "m": "enable_mergejoin", "h": "enable_hashjoin",
}

# The startup parameters that are not settings: PostgreSQL takes these names (case-sensitively) for
# itself; `_pq_.*` are protocol options, which the listener negotiates and does not forward.
_NOT_SETTINGS = frozenset({"user", "database", "replication", "options"})

# What real drivers put in the startup packet (libpq: application_name, client_encoding and, from
# PGDATESTYLE/PGTZ/PGGEQO, datestyle, timezone, geqo; pgjdbc: DateStyle, TimeZone, extra_float_digits,
# search_path for currentSchema; node-postgres: the three timeouts; asyncpg: any server_settings),
# and the other session settings that only change how values are shown, how long a statement may
# wait, or how the planner plans: all of them a session may SET for itself. Nothing here changes the
# role, privileges, logging, the server's files, or how SQL is lexed.
ALLOWED = frozenset({
    "application_name", "client_encoding", "client_min_messages",
    "datestyle", "timezone", "intervalstyle", "extra_float_digits", "bytea_output", "xmlbinary", "xmloption",
    "lc_monetary", "lc_numeric", "lc_time",
    "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "idle_session_timeout",
    "search_path",
    # a read-only policy's default_transaction_read_only=on is sent after the client's settings, so it wins
    "default_transaction_isolation", "default_transaction_read_only", "default_transaction_deferrable",
    "geqo", "jit", "work_mem", *_PLAN_TYPES.values(),
    "escape_string_warning", "standard_conforming_strings",  # the latter only on: see _value_refused
})

# parse_bool's spellings of true, any case (guc.c: a prefix of true or yes, on, 1; no surrounding space).
_TRUE = frozenset({"t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"})

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _fold(name: str) -> str:
    # GUC names compare case-insensitively in ASCII only (guc_name_compare); str.lower() would also
    # fold non-ASCII letters (the Kelvin sign to k) that the server keeps as they are.
    return name.translate(_ASCII_LOWER)


def split_options(text: str) -> list[str]:
    """`options` as pg_split_opts (src/backend/utils/init/postinit.c) splits it into words: at
    whitespace, where a backslash makes the next character (whitespace or backslash too) part of the word."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in _SPACE:
            i += 1
        if i == n:
            break
        word: list[str] = []
        escaped = False
        while i < n and (escaped or text[i] not in _SPACE):
            if not escaped and text[i] == "\\":
                escaped = True
            else:
                escaped = False
                word.append(text[i])
            i += 1
        words.append("".join(word))  # a lone trailing backslash makes an empty word, as in the server
    return words


def _atoi(text: str) -> int:
    # -d's argument goes through atoi(): leading C whitespace, a sign, the digits up to the first
    # non-digit (none: 0); strtol clamps to a 64-bit long and the cast to int keeps its low 32 bits.
    i = 0
    while i < len(text) and text[i] in _SPACE:
        i += 1
    sign = 1
    if i < len(text) and text[i] in "+-":
        sign = -1 if text[i] == "-" else 1
        i += 1
    j = i
    while j < len(text) and text[j] in "0123456789":
        j += 1
    value = sign * int(text[i:j] or "0")
    value = max(-(2**63), min(2**63 - 1, value))
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def _debug_settings(level: int) -> list[tuple[str, str]]:
    # set_debug_options for a client's session (log_connections and log_disconnections are set only
    # from the server's own command line).
    out = [("log_min_messages", f"debug{level}" if level > 0 else "notice")]
    out += [(name, value) for floor, name, value in ((2, "log_statement", "all"), (3, "debug_print_parse", "true"),
                                                    (4, "debug_print_plan", "true"), (5, "debug_print_rewritten", "true"))
            if level >= floor]
    return out


def _stats_setting(arg: str) -> str | None:
    # get_stats_option_name: -t pa[rser], -t pl[anner], -t e[xecutor].
    if arg[:2] == "pa":
        return "log_parser_stats"
    if arg[:2] == "pl":
        return "log_planner_stats"
    return "log_executor_stats" if arg[:1] == "e" else None


def _invalid(word: str) -> OptionsError:
    return OptionsError(f"invalid command-line argument for server process: {word}")


@dataclass(frozen=True)
class _Switch:
    written: str  # as the client wrote it: the setting's name for -c and --, else the switch (-d)
    letter: bool  # a one-letter switch, not -c / --
    settings: tuple[tuple[str, str], ...]  # what it sets, names as PostgreSQL looks them up


def _switches(text: str) -> Iterator[_Switch]:
    """The switches of `options` in order, read with glibc's getopt() as the server does (bundled letters,
    an argument attached or in the next word, `--` ending the switches); OptionsError where it refuses."""
    argv = ["postgres", *split_options(text)]  # the server puts its own name first
    optind = 1
    plain: list[str] = []  # words that are not switches: getopt moves them after the switches
    while optind < len(argv):
        word = argv[optind]
        if word == "--":
            plain += argv[optind + 1:]
            break
        if not word.startswith("-") or word == "-":
            plain.append(word)
            optind += 1
            continue
        start, pos = optind, 1
        while pos < len(word):
            letter = word[pos]
            pos += 1
            if pos == len(word):
                optind += 1  # getopt moves past a word when it reads its last letter
            if letter not in _LETTERS:
                # The server names argv[optind - 1] of getopt's permuted argv: this word if getopt has
                # moved past it (the bad letter was its last byte), else the word before it there, which
                # is the last plain word so far, if any. getopt reads bytes: a non-ASCII letter's first
                # byte is never a word's last.
                if pos == len(word) and letter.isascii():
                    raise _invalid(word)
                raise _invalid(plain[-1] if plain else argv[start - 1])
            arg = ""
            if letter in _TAKES_ARG:
                if pos < len(word):
                    arg, pos = word[pos:], len(word)
                    optind += 1
                elif optind < len(argv):
                    arg = argv[optind]  # the next word, whatever it looks like
                    optind += 1
                else:
                    raise _invalid(word)
            yield _switch(letter, arg, argv[optind - 1])
    if plain:
        # no database name is taken from the startup packet's options: any plain word is refused (the
        # switches around it were read first, but the session does not start)
        raise _invalid(plain[0])


def _switch(letter: str, arg: str, last_word: str) -> _Switch:
    if letter in "c-":
        # ParseLongOption: the name is up to the first '=', with '-' read as '_'
        name, eq, value = arg.partition("=")
        if not eq:
            raise OptionsError(f"--{arg} requires a value" if letter == "-" else f"-c {arg} requires a value")
        return _Switch(name or '""', False, ((name.replace("-", "_"), value),))
    if letter in _FIXED:
        name, value = _FIXED[letter]
        return _Switch(f"-{letter}", True, ((name, arg if value is None else value),))
    if letter == "d":
        return _Switch("-d", True, tuple(_debug_settings(_atoi(arg))))
    if letter == "f":
        if arg[:1] not in _PLAN_TYPES:
            raise _invalid(last_word)
        return _Switch("-f", True, ((_PLAN_TYPES[arg[:1]], "false"),))
    if letter == "t":
        name = _stats_setting(arg)
        if name is None:
            raise _invalid(last_word)
        return _Switch("-t", True, ((name, "true"),))
    assert letter in _INERT
    return _Switch(f"-{letter}", True, ())


def settings_from_options(text: str) -> list[tuple[str, str]]:
    """The (name, value) settings PostgreSQL would apply for this `options` string, in order, names as it
    looks them up (case aside). Raises OptionsError where the server would refuse the string itself;
    whether each name is a real setting and each value valid is the server's to say."""
    return [setting for switch in _switches(text) for setting in switch.settings]


def _value_refused(name: str, value: str) -> str | None:
    """Why an allowed setting's value is refused, or None."""
    if name == "standard_conforming_strings" and value.translate(_ASCII_LOWER) not in _TRUE:
        # with it off the server reads backslashes in '...' as escapes and the gateway would misread SQL
        return ("would make PostgreSQL read SQL unlike the gateway (standard_conforming_strings is off for such "
                "a session; the gateway reads SQL with it on)")
    return None


def _why(name: str, value: str) -> str | None:
    folded = _fold(name)
    if folded in ROLE_SETTINGS:
        return "would act as another database role, which the gateway does not allow"
    if folded not in ALLOWED:
        return "is not allowed through the gateway (it is not one of the harmless session settings the gateway passes on)"
    return _value_refused(folded, value)


def refused_setting(params: dict[str, str]) -> tuple[str, str] | None:
    """The first startup setting the gateway refuses, as (its name as the client wrote it, why), or None.

    Settings come from `options` (which PostgreSQL applies first) and from every other startup parameter
    but user, database, replication and `_pq_.*`. `options` that cannot be read is refused as a whole:
    the gateway passes on only what it has read as the server will."""
    if "options" in params:
        try:
            switches = list(_switches(params["options"]))
        except OptionsError as exc:
            return "options", f"cannot be read as PostgreSQL reads it ({exc})"
        for switch in switches:  # a switch that sets nothing for a client (-E, -T...) has nothing to refuse
            for name, value in switch.settings:
                if (why := _why(name, value)) is None:
                    continue
                if switch.letter:  # -d, -B...: name the setting it would change as well
                    return switch.written, f"in options would set {name}, which {why}"
                return switch.written, f"in options {why}"
    for key, value in params.items():
        if key in _NOT_SETTINGS or key.startswith("_pq_."):
            continue
        if (why := _why(key, value)) is not None:
            return key, f"as a parameter of its own {why}"
    return None
