"""Statements that write many rows at once, for the batched registry writes (sessions.py,
reports.py).

The ORM's `bulk_create` compiles every field of every row, and `bulk_update` writes a `CASE`
per row: costly for batches of hundreds of rows (docs/performance.md). Here the SQL is built
once per batch and executed for every row (`executemany`: a loop in C on SQLite, one pipeline on
PostgreSQL), the values prepared by their model fields (datetimes, JSON, addresses) as the ORM
would. Not one statement with a VALUES list of every row: binding thousands of parameters on the
client costs the server more CPU than executing one small statement per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from django.db import connection
from django.db.models import Model
from django.db.models.constants import OnConflict

Key = TypeVar("Key")

CHUNK = 5000  # ids per IN (...) list: well inside SQLite's limit on bound parameters


def chunks(ids: Sequence[Key]) -> list[Sequence[Key]]:
    """`ids` in slices of at most CHUNK, for the IN lists of one statement each."""
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


def insert_rows(
    model: type[Model],
    common: dict[str, object],
    varying: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    ignore_conflicts: bool = False,
) -> None:
    """INSERT `rows` (values of the `varying` fields, in that order); every other field gets its
    value from `common` or its default, prepared once. ON CONFLICT DO NOTHING if asked."""
    if not rows:
        return
    meta, ops = model._meta, connection.ops
    fields = [f for f in meta.concrete_fields if not (f.primary_key and f.name not in varying)]
    template = model(**common)
    constant = {
        f.name: f.get_db_prep_save(f.pre_save(template, True), connection)
        for f in fields
        if f.name not in varying
    }
    position = {name: i for i, name in enumerate(varying)}
    params = [
        [
            f.get_db_prep_save(row[position[f.name]], connection)
            if f.name in position
            else constant[f.name]
            for f in fields
        ]
        for row in rows
    ]
    conflict = OnConflict.IGNORE if ignore_conflicts else None
    sql = (
        f"{ops.insert_statement(on_conflict=conflict)} {ops.quote_name(meta.db_table)} "
        f"({', '.join(ops.quote_name(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))})"
        f"{ops.on_conflict_suffix_sql(fields, conflict, None, None) or ''}"
    )
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def update_rows(
    model: type[Model],
    names: Sequence[str],
    rows: Sequence[tuple[object, dict[str, object]]],
) -> None:
    """UPDATE the fields `names` of each row given as (primary key, {name: value})."""
    if not rows:
        return
    meta, quote = model._meta, connection.ops.quote_name
    fields = [meta.get_field(name) for name in names]
    assignments = ", ".join(f"{quote(f.column)} = %s" for f in fields)
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"
    params = [
        [f.get_db_prep_save(values[f.name], connection) for f in fields]
        + [meta.pk.get_db_prep_value(pk, connection)]
        for pk, values in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)
