"""A fresh PostgreSQL database per test, for the job store's tests on the real server.

The server is the one developer and CI machines run on 127.0.0.1:5432
(``SLIDEPIPE_TEST_PG_URL`` to point elsewhere); each test gets its own database, dropped
afterwards, so parallel runs sharing the server never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN_URL = os.environ.get("SLIDEPIPE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


# -- PostgreSQL -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_admin() -> str:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            pass
    except psycopg.OperationalError as err:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {err}")
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"slidepipe_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = pg_admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
