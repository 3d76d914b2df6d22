"""The job store's connection to its database: engine, sessions, schema, health.

SQLite (the default, one file in the data dir) or PostgreSQL (by URL), through
SQLAlchemy 2; shared by the API's side of the store and the workers' side.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import (
    text,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from workers.jobs.rows import (
    Base,
    make_engine,
    normalise_url,
)

log = logging.getLogger(__name__)


def rowcount(result: object) -> int:
    """Rows an UPDATE matched. ``Session.execute`` returns a ``CursorResult`` for DML
    statements but is typed as returning a plain ``Result``, which has no rowcount."""
    if not isinstance(result, CursorResult):
        raise TypeError(f"expected the CursorResult of a DML statement, got {type(result)}")
    return result.rowcount


class Database:
    """One engine and session factory per process; every write is one transaction."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            self.create_schema()

    # -- plumbing -----------------------------------------------------------------------
    def create_schema(self) -> None:
        """Create missing tables; tolerant of another process doing the same at once."""
        for attempt in range(3):
            try:
                Base.metadata.create_all(self.engine)
                return
            except (IntegrityError, ProgrammingError, OperationalError) as err:
                if attempt == 2:
                    raise
                log.info("schema creation raced with another process (%s); retrying", err)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        """Raise when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
