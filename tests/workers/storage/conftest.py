"""The S3 server fixtures (tests/s3server.py) for the storage tests."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3server import s3_env, s3_server  # noqa: F401 - fixtures
from workers.jobs.store import JobStore


@pytest.fixture
def job_db(tmp_path: Path) -> Iterator[JobStore]:
    """A job database of the test's own (SQLite in its temp folder)."""
    db = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        yield db
    finally:
        db.dispose()
