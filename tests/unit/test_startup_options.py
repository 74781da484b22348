"""Startup options read as PostgreSQL reads them (pg_split_opts, then getopt over the server's switches),
and the gateway's refusal of any setting that is not a harmless session setting."""

import pytest

from wardgate.engines.postgres.options import ALLOWED, OptionsError, refused_setting, settings_from_options, split_options


@pytest.mark.parametrize(("text", "words"), [
    ("", []),
    ("   ", []),
    ("-c a=b", ["-c", "a=b"]),
    ("  -c\ta=b\n-e\r\v\f-E  ", ["-c", "a=b", "-e", "-E"]),  # C's isspace() set
    ("-c\x1ca=b", ["-c\x1ca=b"]),  # Python's str.isspace() counts \x1c; C's does not
    ("-c\u00a0a=b", ["-c\u00a0a=b"]),
    (r"-c a=x\ y", ["-c", "a=x y"]),  # a backslash keeps the space in the word
    (r"-c a=x\\ y", ["-c", "a=x\\", "y"]),  # ... and an escaped backslash does not
    (r"-c a=x\\\ y", ["-c", "a=x\\ y"]),
    (r"-c r\ole=x", ["-c", "role=x"]),  # any character can be escaped
    ("-c a=b \\", ["-c", "a=b", ""]),  # a lone trailing backslash is an empty word
    ("-c\\\ta=b", ["-c\ta=b"]),
])
def test_split_options_is_pg_split_opts(text, words) -> None:
    assert split_options(text) == words


@pytest.mark.parametrize(("text", "settings"), [
    ("-c role=x", [("role", "x")]),
    ("-crole=x", [("role", "x")]),  # the argument attached
    ("-ecrole=x", [("datestyle", "euro"), ("role", "x")]),  # bundled: -e, then -c with the rest of the word
    ("-Ecrole=x", [("role", "x")]),  # -E sets nothing from a client, but -c still follows it
    ("-Ec role=x", [("role", "x")]),  # a bundle's last switch takes the next word
    ("-e-role=x", [("datestyle", "euro"), ("role", "x")]),  # '-' is a switch letter too
    ("-Pe", [("ignore_system_indexes", "true"), ("datestyle", "euro")]),
    ("-c -x=y", [("_x", "y")]),  # the next word is the argument whatever it looks like
    ("-c --", None),  # ... even "--" (which has no '=')
    ("--role=x", [("role", "x")]),
    ("--session-authorization=x", [("session_authorization", "x")]),  # '-' in a name reads as '_'
    ("-c session-authorization=x", [("session_authorization", "x")]),
    ("-c Session_Authorization=x", [("Session_Authorization", "x")]),  # case is the GUC lookup's to fold
    ("---role=x", [("_role", "x")]),
    ("-c a=b=c", [("a", "b=c")]),  # the name ends at the first '='
    ("-c a=x-y", [("a", "x-y")]),  # values keep their dashes
    ("-c a=", [("a", "")]),
    ("-c =x", [("", "x")]),
    (r"-c\ role=x", [(" role", "x")]),
    (r"-c r\ole=x", [("role", "x")]),
    (r"-c application_name=a\\ -c role=x", [("application_name", "a\\"), ("role", "x")]),
    (r"-c application_name=a\ -c\ role=x", [("application_name", "a -c role=x")]),
    ("-c a=b --", [("a", "b")]),  # "--" ends the switches; nothing may follow it
    ("--", []),
    ("-c statement_timeout=5s -c search_path=public,app", [("statement_timeout", "5s"), ("search_path", "public,app")]),
    ("-c role", None),  # a setting needs a value
    ("--role", None),
    ("-c", None),  # a switch's argument is missing
    ("-ec", None),
    ("-c a=b -B", None),
    ("-c\\", None),
    ("foo", None),  # no plain words: a database name is not taken from here
    ("-c a=b foo", None),
    ("foo -c a=b", None),
    ("-", None),
    ("-- -c a=b", None),
    ("-c a=b -- x", None),
    ("-x", None),  # not one of the server's switches
    ("-eX", None),
    ("-e:", None),
    ("-f", None),
    ("-fx", None),  # not a plan type
    ("-f \\", None),  # an empty argument (a lone backslash)
    ("-tx", None),
    ("-tp", None),
    ("-t", None),
])
def test_settings_from_options_reads_switches_as_getopt(text, settings) -> None:
    if settings is None:
        with pytest.raises(OptionsError):
            settings_from_options(text)
    else:
        assert settings_from_options(text) == settings


@pytest.mark.parametrize(("text", "message"), [
    ("--role", "--role requires a value"),
    ("-c role", "-c role requires a value"),
    ("foo -c role", "-c role requires a value"),  # getopt reads the switches after a plain word first
    ("foo", "invalid command-line argument for server process: foo"),
    ("-c a=b foo bar", "invalid command-line argument for server process: foo"),
    ("foo -x", "invalid command-line argument for server process: -x"),
    ("-c a=b -- x", "invalid command-line argument for server process: x"),
    ("foo -- bar", "invalid command-line argument for server process: foo"),
    ("-x", "invalid command-line argument for server process: -x"),
    ("-ec", "invalid command-line argument for server process: -ec"),
    ("-f x", "invalid command-line argument for server process: x"),  # the word the switch used last
    ("-fx", "invalid command-line argument for server process: -fx"),
    ("-t p", "invalid command-line argument for server process: p"),
    # a bad letter before the end of its word: the server names the word before it in getopt's argv
    ("-Xe", "invalid command-line argument for server process: postgres"),
    ("-c a=b -Xe", "invalid command-line argument for server process: a=b"),
    ("foo -c a=b -Xe", "invalid command-line argument for server process: foo"),
    ("-c a=b -e\u00e9", "invalid command-line argument for server process: a=b"),  # getopt reads bytes
    ("-\u00e9", "invalid command-line argument for server process: postgres"),
])
def test_errors_say_what_postgresql_says(text, message) -> None:
    with pytest.raises(OptionsError) as exc:
        settings_from_options(text)
    assert str(exc.value) == message and isinstance(exc.value, ValueError)


# Every switch of process_postgres_switches, with what a client's use of it sets.
@pytest.mark.parametrize(("text", "settings"), [
    ("-B 64MB", [("shared_buffers", "64MB")]),
    ("-b", []),
    ("-C name", []),
    ("-c a=b", [("a", "b")]),
    ("-D /tmp", []),
    ("-d 3", [("log_min_messages", "debug3"), ("log_statement", "all"), ("debug_print_parse", "true")]),
    ("-E", []),
    ("-e", [("datestyle", "euro")]),
    ("-F", [("fsync", "false")]),
    ("-f s", [("enable_seqscan", "false")]),
    ("-h 0.0.0.0", [("listen_addresses", "0.0.0.0")]),
    ("-i", [("listen_addresses", "*")]),
    ("-j", []),
    ("-k /tmp", [("unix_socket_directories", "/tmp")]),
    ("-l", [("ssl", "true")]),
    ("-N 5", [("max_connections", "5")]),
    ("-n", []),
    ("-O", [("allow_system_table_mods", "true")]),
    ("-P", [("ignore_system_indexes", "true")]),
    ("-p 5433", [("port", "5433")]),
    ("-r /tmp/out", []),
    ("-S 4MB", [("work_mem", "4MB")]),
    ("-s", [("log_statement_stats", "true")]),
    ("-T", []),
    ("-t pa", [("log_parser_stats", "true")]),
    ("-v 3", []),
    ("-W 30", [("post_auth_delay", "30")]),
    ("--a=b", [("a", "b")]),
])
def test_every_switch(text, settings) -> None:
    assert settings_from_options(text) == settings


@pytest.mark.parametrize(("arg", "name"), [
    ("s", "enable_seqscan"), ("i", "enable_indexscan"), ("o", "enable_indexonlyscan"), ("b", "enable_bitmapscan"),
    ("t", "enable_tidscan"), ("n", "enable_nestloop"), ("m", "enable_mergejoin"), ("h", "enable_hashjoin"),
    ("seqscan", "enable_seqscan"),  # only the first letter counts
])
def test_plan_types(arg, name) -> None:
    assert settings_from_options(f"-f{arg}") == [(name, "false")]


@pytest.mark.parametrize(("arg", "name"), [("pa", "log_parser_stats"), ("parser", "log_parser_stats"),
                                           ("pl", "log_planner_stats"), ("e", "log_executor_stats")])
def test_stats_switch(arg, name) -> None:
    assert settings_from_options(f"-t {arg}") == [(name, "true")]


@pytest.mark.parametrize(("arg", "level"), [
    ("0", "notice"), ("-2", "notice"), ("x", "notice"), ("1", "debug1"), ("2x", "debug2"), ("+4", "debug4"),
    ("\\ 5", "debug5"), ("6", "debug6"), ("4294967297", "debug1"),  # atoi: leading space, sign, low 32 bits
])
def test_debug_level_is_read_with_atoi(arg, level) -> None:
    assert settings_from_options(f"-d {arg}")[0] == ("log_min_messages", level)


def test_debug_levels_turn_on_more_logging() -> None:
    names = [[n for n, _ in settings_from_options(f"-d{level}")] for level in range(6)]
    assert names[0] == names[1] == ["log_min_messages"]
    assert names[2] == ["log_min_messages", "log_statement"]
    assert names[5] == ["log_min_messages", "log_statement", "debug_print_parse", "debug_print_plan", "debug_print_rewritten"]


# What drivers put in their startup packets.
@pytest.mark.parametrize("params", [
    {"user": "u", "database": "d", "application_name": "psql", "client_encoding": "UTF8"},  # psql / libpq
    {"user": "u", "database": "d", "application_name": "pgbench"},
    {"user": "u", "database": "d", "datestyle": "ISO", "timezone": "UTC", "geqo": "off"},  # PGDATESTYLE, PGTZ, PGGEQO
    {"user": "u", "database": "d", "client_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "Europe/Paris",
     "extra_float_digits": "3", "application_name": "PostgreSQL JDBC Driver", "search_path": "app"},  # pgjdbc
    {"user": "u", "database": "d", "client_encoding": "utf-8", "application_name": "x", "jit": "off"},  # asyncpg
    {"user": "u", "database": "d", "application_name": "n", "statement_timeout": "5000", "lock_timeout": "100",
     "idle_in_transaction_session_timeout": "1000", "options": "-c search_path=x"},  # node-postgres
    {"user": "u", "database": "d", "_pq_.compression": "on", "replication": "false"},
    {"user": "u", "options": "-c statement_timeout=5s --idle-session-timeout=1min -e -fs -S 4MB"},
    {"user": "u", "options": "-E -T -n -b -C x -D /x -r /x -v 3 -j"},  # switches that set nothing from a client
    {"user": "u", "options": "-c standard_conforming_strings=on", "standard_conforming_strings": "ON"},
    {"user": "u", "options": "-c STATEMENT_TIMEOUT=1 -c application-name=x", "IntervalStyle": "iso_8601"},
    {"user": "u", "options": ""},
])
def test_what_drivers_send_is_allowed(params) -> None:
    assert refused_setting(params) is None


@pytest.mark.parametrize(("params", "name"), [
    ({"options": "-ecrole=x"}, "role"),
    ({"options": "-Ecrole=x"}, "role"),
    ({"options": "-c role=x"}, "role"),
    ({"options": "-c ROLE=x"}, "ROLE"),
    ({"options": "--role=x"}, "role"),
    ({"options": "-e-role=x"}, "role"),
    ({"options": "-c session_authorization=x"}, "session_authorization"),
    ({"options": "--session-authorization=x"}, "session-authorization"),
    ({"options": r"-c r\ole=x"}, "role"),
    ({"options": r"-c application_name=a\\ -c role=x"}, "role"),
    ({"options": "-c search_path=public -c session_authorization=x"}, "session_authorization"),
    ({"Role": "x"}, "Role"),
    ({"session_authorization": "x"}, "session_authorization"),
])
def test_role_switches_are_refused(params, name) -> None:
    got = refused_setting({"user": "u", "database": "d", **params})
    assert got is not None and got[0] == name and "another database role" in got[1]


@pytest.mark.parametrize(("params", "name"), [
    ({"options": "-c log_statement=none"}, "log_statement"),
    ({"options": "-c standard_conforming_strings=off"}, "standard_conforming_strings"),
    ({"options": "-c standard_conforming_strings=of"}, "standard_conforming_strings"),
    ({"standard_conforming_strings": "0"}, "standard_conforming_strings"),
    ({"options": "-c backslash_quote=on"}, "backslash_quote"),
    ({"options": "-c session_replication_role=replica"}, "session_replication_role"),
    ({"options": "-c pgaudit.log=none"}, "pgaudit.log"),
    ({"options": "-c lc_messages=C"}, "lc_messages"),
    ({"options": "-c sort_mem=1MB"}, "sort_mem"),  # an old alias of work_mem: not on the list under this name
    ({"options": r"-c\ role=x"}, " role"),
    ({"options": "-c =x"}, '""'),
    ({"options": "-c wor\u212a_mem=1MB"}, "wor\u212a_mem"),  # the Kelvin sign is not a k to PostgreSQL
    ({"options": "-d 0"}, "-d"),
    ({"options": "-c work_mem=1MB -B 8MB"}, "-B"),
    ({"options": "-P"}, "-P"),
    ({"options": "-W 60"}, "-W"),
    ({"options": "-s"}, "-s"),
    ({"options": "-tpl"}, "-t"),
    ({"options": "-O"}, "-O"),
    ({"options": "-F"}, "-F"),
    ({"options": "-c role"}, "options"),  # what cannot be read is refused whole
    ({"options": "-c a=b foo"}, "options"),
    ({"options": "-x"}, "options"),
    ({"Options": "-c a=b"}, "Options"),  # PostgreSQL's own names are case-sensitive: this is a setting
    ({"User": "postgres"}, "User"),
    ({"wardgate_unknown": "1"}, "wardgate_unknown"),
    ({"application-name": "x"}, "application-name"),  # dashes read as '_' only inside options
])
def test_everything_else_is_refused(params, name) -> None:
    got = refused_setting({"user": "u", "database": "d", **params})
    assert got is not None and got[0] == name, got


def test_refusals_say_where_and_why() -> None:
    assert refused_setting({"options": "-c log_statement=none"}) == (
        "log_statement", "in options is not allowed through the gateway (it is not one of the harmless session "
        "settings the gateway passes on)")
    name, why = refused_setting({"options": "-d 2"})
    assert name == "-d" and why.startswith("in options would set log_min_messages, which is not allowed")
    name, why = refused_setting({"Role": "x"})
    assert why.startswith("as a parameter of its own would act as another database role")
    name, why = refused_setting({"options": "--role"})
    assert name == "options" and "--role requires a value" in why
    assert "standard_conforming_strings is off" in refused_setting({"options": "-c standard_conforming_strings=off"})[1]
    # options come first, as PostgreSQL applies them first
    assert refused_setting({"log_statement": "all", "options": "-c role=x"})[0] == "role"


def test_the_allow_list_holds_no_privilege_logging_file_or_lexing_setting() -> None:
    dangerous = {"role", "session_authorization", "session_replication_role", "log_statement", "log_min_messages",
                 "log_min_duration_statement", "lc_messages", "backslash_quote", "allow_system_table_mods",
                 "ignore_system_indexes", "post_auth_delay", "local_preload_libraries", "session_preload_libraries",
                 "dynamic_library_path", "temp_tablespaces", "default_tablespace", "row_security", "zero_damaged_pages",
                 "transaction_read_only", "timezone_abbreviations", "password_encryption"}
    assert not dangerous & ALLOWED
    assert all(name == name.lower() for name in ALLOWED)
