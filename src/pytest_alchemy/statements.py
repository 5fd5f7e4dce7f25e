"""What a statement's text proves about it: whether it can write anything a rollback undoes.

The sandbox's ledger (:class:`pytest_alchemy.sandbox.Savepoints`) turns the rollback of a
savepoint that holds no writes into a release, and keeps such a savepoint for the next
transaction to reuse; both are only right when nothing was written. So a statement counts
as a read only when its text proves it: a ``SELECT`` (or ``WITH``/``VALUES``) that names no
DML, takes no row lock, selects into nothing and calls only functions known to write
nothing; ``SHOW``, ``DESCRIBE``, ``EXPLAIN`` without ``ANALYZE``, a ``PRAGMA`` that sets
nothing. Everything else, ``SELECT my_function()`` included, counts as a write: calling a
read a write costs one round trip at most, the reverse loses what production would undo.
"""

from __future__ import annotations

import functools
import re


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_TOKEN = re.compile(
    r"""
    (?P<skip>--[^\n]*|/\*.*?\*/|'(?:[^'\\]|'')*'|\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$)
    |(?P<quoted>"(?:[^"]|"")*"|`(?:[^`]|``)*`)
    |(?P<word>[A-Za-z_][\w$]*)
    |(?P<other>\S)
    """,
    re.S | re.X,
)

#: Statements that read, whatever follows them (transaction control is the ledger's own).
_READ_HEADS = frozenset({"SHOW", "DESCRIBE", "DESC", "SAVEPOINT", "RELEASE", "ROLLBACK"})
#: Statements whose body decides.
_QUERY_HEADS = frozenset({"SELECT", "WITH", "VALUES", "TABLE"})
#: Words that make a query a write: DML in a CTE, SELECT ... INTO, row locks (FOR UPDATE,
#: FOR [KEY] SHARE, LOCK IN SHARE MODE), and statements that have no place in a query.
_WRITE_WORDS = frozenset(
    {"INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "SHARE", "LOCK", "CALL", "COPY", "NOTIFY"}
)
#: Words a parenthesis may follow without being a function call (keywords, types in a CAST).
_NOT_CALLS = _words(
    """
    all and any array as asc between by case cast collate conflict desc distinct else end escape
    except exists filter from glob group having ilike in index intersect is join lateral like limit
    match against materialized not nulls offset on or order over partition recursive regexp row
    rows range groups select similar some then to tuple union using values when where window
    with within zone
    bigint binary bit char character date datetime dec decimal double float int integer
    interval nchar numeric nvarchar real signed smallint text time timestamp timestamptz
    unsigned varbinary varchar varying
    """
)
#: Functions of PostgreSQL, MySQL/MariaDB and SQLite (and common extensions) that write
#: nothing: aggregates, window functions, scalar and table-valued functions as ORMs and
#: reflection use them.
_READ_FUNCTIONS = _words(
    """
    abs acos age array_agg array_append array_cat array_length array_lower array_position
    array_positions array_prepend array_remove array_replace array_to_json array_to_string
    array_upper ascii asin atan atan2 avg bit_and bit_length bit_or bit_xor bool_and bool_or
    btrim cardinality cbrt ceil ceiling char_length character_length chr coalesce
    col_description concat concat_ws convert cos cot count cume_dist curdate current_database
    current_date current_schema current_schemas current_setting current_time
    current_timestamp current_user curtime database date_add date_format date_part date_sub
    date_trunc datediff day dayofmonth dayofweek dayofyear degrees dense_rank elt encode
    decode every exp extract field find_in_set first_value floor format format_type
    from_unixtime generate_series generate_subscripts gen_random_uuid greatest group_concat
    hex hour iif ifnull initcap instr isnull json_agg json_array json_array_elements
    json_array_elements_text json_array_length json_arrayagg json_build_array
    json_build_object json_contains json_each json_each_text json_extract json_extract_path
    json_extract_path_text json_group_array json_group_object json_insert json_keys
    json_length json_object json_object_agg json_objectagg json_quote json_remove
    json_replace json_search json_set json_type json_typeof json_unquote json_valid
    jsonb_agg jsonb_array_elements jsonb_array_elements_text jsonb_array_length
    jsonb_build_array jsonb_build_object jsonb_each jsonb_each_text jsonb_extract_path
    jsonb_extract_path_text jsonb_object_agg jsonb_object_keys jsonb_path_exists
    jsonb_path_query jsonb_set jsonb_strip_nulls jsonb_typeof julianday lag last_insert_id
    last_insert_rowid last_value lcase lead least left length ln localtime localtimestamp
    locate log log10 log2 lower lpad ltrim make_date make_interval make_timestamp max md5
    min minute mod mode month now nth_value ntile nullif nvl obj_description octet_length
    percent_rank percentile_cont percentile_disc phraseto_tsquery pi plainto_tsquery
    position pow power printf quote quote_ident quote_literal quote_nullable radians random
    rank regexp_like regexp_match regexp_matches regexp_replace regexp_split_to_array
    regexp_substr repeat replace reverse right round row_number row_to_json rpad rtrim
    second sha1 sha2 sign similarity sin split_part sqrt stddev stddev_pop stddev_samp
    strftime string_agg string_to_array strpos substr substring sum sysdate tan
    time_format timestampdiff timezone to_char to_date to_json to_jsonb to_number
    to_timestamp to_tsquery to_tsvector total translate trim trunc ts_headline ts_rank
    ts_rank_cd typeof ucase unhex unistr unix_timestamp unnest upper user utc_date
    utc_time utc_timestamp uuid uuid_generate_v4 var_pop var_samp variance version
    websearch_to_tsquery week weekday year
    """
)
#: PostgreSQL's catalog functions that only read: pg_get_*, pg_*_is_visible,
#: has_*_privilege, and a few more that reflection and health checks call.
_READ_CATALOG = re.compile(
    r"pg_get_\w+|pg_\w+_is_visible|has_\w+_privilege|pg_typeof|pg_backend_pid|pg_is_in_recovery"
    r"|pg_encoding_to_char|pg_column_size|pg_relation_size|pg_total_relation_size"
    r"|pg_size_pretty|pg_postmaster_start_time|pg_index_column_has_property"
    r"|pg_current_xact_id_if_assigned|txid_current_if_assigned|inet_server_addr"
)
#: Schemas whose functions are the server's own, not the application's.
_SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
#: SQLite pragmas that take an argument in parentheses and still only read.
_READ_PRAGMAS = _words(
    """
    table_info table_xinfo table_list index_list index_info index_xinfo foreign_key_list
    foreign_key_check integrity_check quick_check
    """
)


def _tokens(statement: str) -> list[tuple[str, str]]:
    return [
        (match.lastgroup or "other", match.group())
        for match in _TOKEN.finditer(statement)
        if match.lastgroup != "skip"
    ]


@functools.lru_cache(maxsize=4096)
def proves_read_only(statement: str) -> bool:
    """Whether ``statement`` provably writes nothing a rollback would undo."""
    tokens = _tokens(statement)
    if not tokens or tokens[0][0] != "word":
        return False
    head = tokens[0][1].upper()
    if head in _READ_HEADS:
        return True
    if head == "EXPLAIN":
        return not any(v.upper() in {"ANALYZE", "ANALYSE"} for k, v in tokens if k == "word")
    if head == "PRAGMA":
        return _pragma_reads(tokens)
    return head in _QUERY_HEADS and _query_reads(tokens)


def _pragma_reads(tokens: list[tuple[str, str]]) -> bool:
    values = [v for _, v in tokens]
    if "=" in values:
        return False
    if "(" not in values:
        return True
    name = values[values.index("(") - 1]
    return name.lower() in _READ_PRAGMAS


def _query_reads(tokens: list[tuple[str, str]]) -> bool:
    words = (value.upper() for kind, value in tokens if kind == "word")
    return _WRITE_WORDS.isdisjoint(words) and _calls_only_reads(tokens)


def _calls_only_reads(tokens: list[tuple[str, str]]) -> bool:
    """Whether every function the tokens call is one known to write nothing."""
    for index, (kind, value) in enumerate(tokens):
        if kind == "other" and value == "'":
            return False  # a string the tokenizer could not read (backslashes): unknown
        if value != "(" or index == 0:
            continue
        before_kind, before = tokens[index - 1]
        if before_kind == "quoted":
            return False  # "some_function"(...): the application's own
        if before_kind != "word" or before.lower() in _NOT_CALLS:
            continue
        if not _reads_when_called(tokens, index - 1):
            return False
    return True


def _reads_when_called(tokens: list[tuple[str, str]], at: int) -> bool:
    name = tokens[at][1].lower()
    if at >= 2 and tokens[at - 1][1] == ".":
        schema = tokens[at - 2][1].lower().strip('"`')
        if schema not in _SYSTEM_SCHEMAS:
            return False  # a function in one of the application's schemas
    return name in _READ_FUNCTIONS or _READ_CATALOG.fullmatch(name) is not None


#: Statements that insert rows into the table they name (so may advance its id counter).
_INSERTS = frozenset({"INSERT", "REPLACE", "MERGE", "COPY"})
#: Statements that change rows but never take an id from a counter.
_CHANGES = frozenset({"UPDATE", "DELETE"})


@functools.lru_cache(maxsize=4096)
def counted_tables(statement: str) -> frozenset[str] | None:
    """The tables whose id counters (sequences, AUTO_INCREMENT) ``statement`` may advance.

    Names are unquoted and lower-cased, without their schema. Empty for a read, an UPDATE or
    a DELETE; the target of a plain INSERT, REPLACE, MERGE or COPY; None when the text cannot
    tell (a function call, a CTE with DML, ``CALL``, DDL): any counter may have moved.
    """
    if proves_read_only(statement):
        return frozenset()
    tokens = _tokens(statement)
    head = tokens[0][1].upper() if tokens and tokens[0][0] == "word" else ""
    if head in _CHANGES:
        return frozenset() if _calls_only_reads(tokens) else None
    if head not in _INSERTS:
        return None
    at = 1
    if head != "COPY":
        while at < len(tokens) and tokens[at][1].upper() != "INTO":
            at += 1  # INSERT IGNORE / OR REPLACE / LOW_PRIORITY ... INTO
        at += 1
    name = None
    while at < len(tokens) and tokens[at][0] in {"word", "quoted"}:
        name = tokens[at][1]
        at += 1
        if at < len(tokens) and tokens[at][1] == ".":
            at += 1  # schema.table: the table is what follows
            continue
        break
    if name is None:
        return None
    if at < len(tokens) and tokens[at][1] == "(":  # the column list is no call
        depth = 0
        while at < len(tokens):
            depth += {"(": 1, ")": -1}.get(tokens[at][1], 0)
            at += 1
            if depth == 0:
                break
    if not _calls_only_reads(tokens[at:]):
        return None  # nextval('some_sequence'), a function: any counter may have moved
    return frozenset({name.strip('"`').lower()})
