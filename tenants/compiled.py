"""A values() query compiled to SQL once per process and database, then run with new values.

Building and compiling a read's queryset cost a job read 1 to 2.5 ms of CPU per request; the
statement itself ran in 0.15 ms (docs/benchmarks.md, API under load).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from django.core.exceptions import EmptyResultSet, ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import QuerySet
from django.db.models.query import ValuesIterable

# Stand-ins for the values a statement takes at run time, by type: a negative id, never a real
# one, a moment in 1901, before any row, and text no name or key holds; each apart from anything
# a query holds as a constant. A value a lookup rewrites (`startswith` adds a wildcard) no longer
# equals its stand-in, so that statement is built on every call instead.
_MARKS = {
    int: lambda n: -730_000_001 - n,
    datetime: lambda n: datetime(1901, 1, 1, tzinfo=UTC) + timedelta(seconds=n),
    str: lambda n: f"\uffffcompiled-value-{n}\uffff",
}


def _positive_int(n: int) -> int:
    """The int stand-in where a field's range starts at 0: beyond any id a table reaches."""
    return 1_730_000_001 + n


@dataclass(frozen=True)
class _Statement:
    sql: str
    params: tuple
    # (place in params, name of the value run() fills in, the type it is wrapped in or None)
    slots: tuple[tuple[int, str, type | None], ...]
    names: tuple[str, ...]
    converters: tuple[tuple[int, tuple, object], ...]  # (column, from_db_value chain, expression)


def _cursor(connection):
    """A cursor for a compiled statement that may be prepared. Where the connection may keep
    prepared statements (PostgreSQL with psycopg 3 and `prepare_threshold` in the database's
    OPTIONS, which Django leaves unset for connection poolers), one that binds values on the
    server: psycopg then prepares a statement run that many times on the connection, and
    PostgreSQL stops parsing and planning it on every run (the job list's statement: 1.2 of its
    2 ms of database CPU). Elsewhere Django's own cursor, which binds values in the client and
    prepares nothing."""
    if (
        connection.vendor != "postgresql"
        or connection.settings_dict["OPTIONS"].get("prepare_threshold") is None
    ):
        return connection.cursor()
    # Imported here: the PostgreSQL backend needs psycopg, which an SQLite install may lack.
    from django.db.backends.postgresql.base import ServerBindingCursor

    # What connection.cursor() does before it creates Django's cursor.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    connection.validate_thread_sharing()
    cursor = ServerBindingCursor(connection.connection)
    if connection.queries_logged:
        return connection.make_debug_cursor(cursor)
    return connection.make_cursor(cursor)


class CompiledRows:
    """`build(**values)` (a values() queryset; `types` names each value's type: int, datetime
    or str) compiled on first use per database; `rows(**values)` runs that SQL with the values
    given, returning what the queryset would: a dict per row, each column converted as the ORM
    does.

    `build` runs once per database with stand-ins for the values, so whatever it checks (the
    tenancy seal) it checks on the shape of the query, which is the same for every value. Where
    a database's SQL does not carry each value as a parameter of its own (SQLite writes moments
    as text), every call builds and runs the queryset instead.

    `prepared`: the statement may be prepared per connection (_cursor). Only for SQL whose
    values PostgreSQL can take as parameters of their own: a value the ORM repeats in SELECT
    and GROUP BY (a truncated moment) is two parameters there, which PostgreSQL cannot match
    (Django's ticket 20516), so an aggregate over such an expression stays unprepared."""

    def __init__(
        self, build: Callable[..., QuerySet], /, *, prepared: bool = False, **types: type
    ) -> None:
        self._build = build
        self._types = types
        self._prepared = prepared
        self._statements: dict[str, _Statement | None] = {}

    def _compile(self, using: str) -> _Statement | None:
        marks = {name: _MARKS[kind](n) for n, (name, kind) in enumerate(self._types.items())}
        try:
            queryset, compiler, (sql, params) = self._compiled(marks, using)
        except EmptyResultSet:
            # A field whose range starts at 0 (a version number) refuses a negative value outright.
            marks = {
                name: _positive_int(n) if kind is int else mark
                for n, ((name, kind), mark) in enumerate(
                    zip(self._types.items(), marks.values(), strict=True)
                )
            }
            queryset, compiler, (sql, params) = self._compiled(marks, using)
        query = queryset.query
        # A value may reach the SQL wrapped (psycopg's Int4 for a 4-byte integer column): the
        # run wraps its own value the same way.
        slots = tuple(
            (place, name, None if type(param) is type(mark) else type(param))
            for place, param in enumerate(params)
            for name, mark in marks.items()
            if isinstance(param, type(mark)) and not isinstance(param, bool) and param == mark
        )
        if {name for _, name, _ in slots} != set(self._types):
            return None
        fields = [column for column, _, _ in compiler.select[: compiler.col_count]]
        converters = compiler.get_converters(fields)
        return _Statement(
            sql=sql,
            params=tuple(params),
            slots=slots,
            # The keys as ValuesIterable names the columns.
            names=tuple(query.selected)
            if query.selected
            else (*query.extra_select, *query.values_select, *query.annotation_select),
            converters=tuple(
                (column, tuple(chain), expression)
                for column, (chain, expression) in converters.items()
            ),
        )

    def _compiled(self, marks: dict, using: str):
        queryset = self._build(**marks)
        if queryset._iterable_class is not ValuesIterable:
            raise ImproperlyConfigured("CompiledRows builds values() querysets only.")
        compiler = queryset.query.get_compiler(using=using)
        return queryset, compiler, compiler.as_sql()

    def _statement(self, using: str) -> _Statement | None:
        if using not in self._statements:
            self._statements[using] = self._compile(using)
        return self._statements[using]

    def _run(self, statement: _Statement, using: str, values: dict) -> list[tuple]:
        params = list(statement.params)
        for place, name, wrap in statement.slots:
            params[place] = values[name] if wrap is None else wrap(values[name])
        connection = connections[using]
        with _cursor(connection) if self._prepared else connection.cursor() as cursor:
            cursor.execute(statement.sql, params)
            return cursor.fetchall()

    def rows(self, *, using: str = DEFAULT_DB_ALIAS, **values) -> list[dict]:
        statement = self._statement(using)
        if statement is None:
            return list(self._build(**values).using(using))
        fetched = self._run(statement, using, values)
        connection = connections[using]
        result = []
        for row in fetched:
            row = list(row)
            for column, chain, expression in statement.converters:
                value = row[column]
                for converter in chain:
                    value = converter(value, expression, connection)
                row[column] = value
            result.append(dict(zip(statement.names, row, strict=True)))
        return result


class CompiledSelect(CompiledRows):
    """A SELECT over CompiledRows' statement: `select(table)` writes it around `table`, the
    compiled query as a derived table named `compiled` whose columns are its values() keys, so
    what the tenancy seal checked is the query itself and the SELECT only shapes its rows (the
    JSON of an API page built by PostgreSQL). `fetch(**values)` gives the SELECT's rows as
    tuples, or None where the statement does not compile to parameters (CompiledRows)."""

    def __init__(
        self,
        build: Callable[..., QuerySet],
        select: Callable[[str], str],
        /,
        *,
        prepared: bool = False,
        **types: type,
    ) -> None:
        super().__init__(build, prepared=prepared, **types)
        self._select = select

    def _compile(self, using: str) -> _Statement | None:
        statement = super()._compile(using)
        if statement is None:
            return None
        names = connections[using].ops.quote_name
        table = (
            f"({statement.sql}) AS compiled ({', '.join(names(name) for name in statement.names)})"
        )
        return replace(statement, sql=self._select(table), converters=())

    def fetch(self, *, using: str = DEFAULT_DB_ALIAS, **values) -> list[tuple] | None:
        statement = self._statement(using)
        return None if statement is None else self._run(statement, using, values)


def row_fields(model, *, prefix: str = "", leave_out: tuple[str, ...] = ()) -> list[str]:
    """The values() keys of `model`'s columns (`prefix` + each field's name; a foreign key's
    gives its id), for a statement whose rows become instances again (`row_instance`)."""
    return [
        prefix + field.name for field in model._meta.concrete_fields if field.name not in leave_out
    ]


def row_instance(model, row: dict, *, prefix: str = "", using: str = DEFAULT_DB_ALIAS):
    """The `model` instance a queryset would have loaded from the row's `row_fields` columns;
    the fields left out are deferred, as with defer()."""
    fields = [field for field in model._meta.concrete_fields if prefix + field.name in row]
    return model.from_db(
        using, [field.attname for field in fields], [row[prefix + field.name] for field in fields]
    )
