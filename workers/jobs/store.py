"""The job store: owners, slides, batches and jobs in a relational database.

SQLAlchemy 2 ORM over SQLite (the default, one file in the data dir) or PostgreSQL (by
URL). The API writes slides and queued jobs; workers claim jobs and write their state
and progress. Every state change is one conditional ``UPDATE`` (``WHERE status = ...``
and, for a worker, ``WHERE claim = <its token>``), so that two processes racing on one
job (a cancel against a start, a re-delivered message against a live worker) cannot
both win. Times are stored as naive UTC and handed out as aware UTC.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    and_,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from workers.jobs.rows import (
    ACTIVE,
    TERMINAL,
    Base,
    BatchRow,
    JobRow,
    JobStatus,
    Owner,
    SlideRow,
    make_engine,
    new_id,
    normalise_url,
    utcnow,
)

log = logging.getLogger(__name__)


def _rowcount(result: object) -> int:
    """Rows an UPDATE matched. ``Session.execute`` returns a ``CursorResult`` for DML
    statements but is typed as returning a plain ``Result``, which has no rowcount."""
    if not isinstance(result, CursorResult):
        raise TypeError(f"expected the CursorResult of a DML statement, got {type(result)}")
    return result.rowcount


class ClaimOutcome(enum.StrEnum):
    claimed = "claimed"  # this worker now runs the job
    busy = "busy"  # another live worker runs it (a duplicate delivery)
    terminal = "terminal"  # already succeeded, failed or cancelled: nothing to do
    missing = "missing"  # no such job (deleted with its slide)


@dataclass(frozen=True)
class ClaimResult:
    outcome: ClaimOutcome
    job: JobRow | None = None


class JobStore:
    """Data access for the API and the workers; one instance per process is enough."""

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

    @staticmethod
    def _ensure_owner(session: Session, owner: str) -> None:
        if session.get(Owner, owner) is None:
            session.add(Owner(name=owner))
            session.flush()

    # -- slides -------------------------------------------------------------------------
    def find_slide_by_sha(self, owner: str, sha256: str) -> SlideRow | None:
        with self.session() as s:
            return s.scalars(
                select(SlideRow).where(SlideRow.owner == owner, SlideRow.sha256 == sha256)
            ).first()

    def add_slide(self, slide: SlideRow) -> tuple[SlideRow, bool]:
        """Insert ``slide``; on a duplicate (owner, sha256) return the existing row.

        Returns ``(row, created)``.
        """
        try:
            with self.session() as s:
                self._ensure_owner(s, slide.owner)
                s.add(slide)
            return slide, True
        except IntegrityError:
            existing = self.find_slide_by_sha(slide.owner, slide.sha256)
            if existing is None:
                raise
            return existing, False

    def get_slide(self, owner: str, slide_id: str) -> SlideRow | None:
        with self.session() as s:
            return s.scalars(
                select(SlideRow).where(SlideRow.id == slide_id, SlideRow.owner == owner)
            ).first()

    def get_slide_any_owner(self, slide_id: str) -> SlideRow | None:
        """For workers, which act on behalf of whoever queued the job."""
        with self.session() as s:
            return s.get(SlideRow, slide_id)

    def list_slides(self, owner: str, *, limit: int, offset: int) -> tuple[list[SlideRow], int]:
        with self.session() as s:
            total = s.scalar(
                select(func.count()).select_from(SlideRow).where(SlideRow.owner == owner)
            )
            rows = s.scalars(
                select(SlideRow)
                .where(SlideRow.owner == owner)
                .order_by(SlideRow.created_at.desc(), SlideRow.id)
                .limit(limit)
                .offset(offset)
            ).all()
            return list(rows), int(total or 0)

    def count_active_jobs_for_slide(self, slide_id: str) -> int:
        with self.session() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(JobRow)
                    .where(JobRow.slide_id == slide_id, JobRow.status.in_(ACTIVE))
                )
                or 0
            )

    def delete_slide(self, owner: str, slide_id: str) -> list[JobRow] | None:
        """Delete a slide and its jobs; returns the deleted jobs (for their results)."""
        with self.session() as s:
            slide = s.scalars(
                select(SlideRow).where(SlideRow.id == slide_id, SlideRow.owner == owner)
            ).first()
            if slide is None:
                return None
            jobs = list(s.scalars(select(JobRow).where(JobRow.slide_id == slide_id)).all())
            s.execute(delete(JobRow).where(JobRow.slide_id == slide_id))
            s.delete(slide)
            return jobs

    # -- jobs and batches ---------------------------------------------------------------
    def create_jobs(
        self,
        owner: str,
        slide_ids: Sequence[str],
        model: str,
        params: dict[str, Any],
        *,
        batch: bool,
    ) -> tuple[BatchRow | None, list[JobRow]]:
        """Store one queued job per slide (in a new batch when ``batch``), atomically."""
        with self.session() as s:
            self._ensure_owner(s, owner)
            batch_row = None
            if batch:
                batch_row = BatchRow(id=new_id(), owner=owner, model=model, params=params)
                s.add(batch_row)
                s.flush()
            jobs = [
                JobRow(
                    id=new_id(),
                    owner=owner,
                    slide_id=slide_id,
                    batch_id=batch_row.id if batch_row else None,
                    model=model,
                    params=params,
                    status=JobStatus.queued,
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
                for slide_id in slide_ids
            ]
            s.add_all(jobs)
            return batch_row, jobs

    def get_job(self, owner: str | None, job_id: str) -> JobRow | None:
        """A job by id; ``owner=None`` only for workers."""
        with self.session() as s:
            query = select(JobRow).where(JobRow.id == job_id)
            if owner is not None:
                query = query.where(JobRow.owner == owner)
            return s.scalars(query).first()

    def get_batch(self, owner: str, batch_id: str) -> tuple[BatchRow, list[JobRow]] | None:
        with self.session() as s:
            batch = s.scalars(
                select(BatchRow).where(BatchRow.id == batch_id, BatchRow.owner == owner)
            ).first()
            if batch is None:
                return None
            jobs = s.scalars(
                select(JobRow).where(JobRow.batch_id == batch_id).order_by(JobRow.created_at)
            ).all()
            return batch, list(jobs)

    def list_jobs(
        self,
        owner: str,
        *,
        status: str | None = None,
        slide_id: str | None = None,
        batch_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[JobRow], int]:
        conditions = [JobRow.owner == owner]
        if status is not None:
            conditions.append(JobRow.status == status)
        if slide_id is not None:
            conditions.append(JobRow.slide_id == slide_id)
        if batch_id is not None:
            conditions.append(JobRow.batch_id == batch_id)
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(JobRow).where(*conditions))
            rows = s.scalars(
                select(JobRow)
                .where(*conditions)
                .order_by(JobRow.created_at.desc(), JobRow.id)
                .limit(limit)
                .offset(offset)
            ).all()
            return list(rows), int(total or 0)

    def fail_unqueued(self, job_ids: Sequence[str], error: str) -> None:
        """Jobs stored but never handed to the broker are failed, not left queued forever."""
        now = utcnow()
        with self.session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id.in_(list(job_ids)), JobRow.status == JobStatus.queued)
                .values(status=JobStatus.failed, error=error, finished_at=now, updated_at=now)
            )

    def request_cancel(self, owner: str, job_id: str) -> JobRow | None:
        """Cancel a queued job at once; flag a running one for its worker to stop."""
        now = utcnow()
        with self.session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.owner == owner, JobRow.status == "queued")
                .values(
                    status=JobStatus.cancelled,
                    cancel_requested=True,
                    stage=None,
                    finished_at=now,
                    updated_at=now,
                )
            )
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.owner == owner, JobRow.status == "running")
                .values(cancel_requested=True, updated_at=now)
            )
        return self.get_job(owner, job_id)

    # -- worker side --------------------------------------------------------------------
    def claim(self, job_id: str, token: str, worker: str, stale_after_s: float) -> ClaimResult:
        """Take a job for one run: a queued one, or a running one whose worker went silent.

        A job flagged for cancellation is cancelled here instead of run.
        """
        now = utcnow()
        stale_before = now - timedelta(seconds=stale_after_s)
        with self.session() as s:
            s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.cancel_requested.is_(True),
                    JobRow.status.in_(ACTIVE),
                    or_(
                        JobRow.status == "queued",
                        JobRow.heartbeat_at.is_(None),
                        JobRow.heartbeat_at < stale_before,
                    ),
                )
                .values(status=JobStatus.cancelled, finished_at=now, updated_at=now, claim=None)
            )
            result = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    or_(
                        JobRow.status == "queued",
                        and_(
                            JobRow.status == "running",
                            or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < stale_before),
                        ),
                    ),
                )
                .values(
                    status=JobStatus.running,
                    claim=token,
                    worker=worker,
                    attempts=JobRow.attempts + 1,
                    started_at=func.coalesce(JobRow.started_at, now),
                    heartbeat_at=now,
                    updated_at=now,
                    error=None,
                )
            )
            job = s.get(JobRow, job_id, populate_existing=True)
        if job is None:
            return ClaimResult(ClaimOutcome.missing)
        if _rowcount(result) == 1 and job.claim == token:
            return ClaimResult(ClaimOutcome.claimed, job)
        if job.status in TERMINAL:
            return ClaimResult(ClaimOutcome.terminal, job)
        return ClaimResult(ClaimOutcome.busy, job)

    def _owned(self, job_id: str, token: str) -> Any:
        return and_(JobRow.id == job_id, JobRow.claim == token, JobRow.status == "running")

    def heartbeat(self, job_id: str, token: str) -> tuple[bool, bool]:
        """Prove the claim alive; returns ``(still_ours, cancel_requested)``."""
        now = utcnow()
        with self.session() as s:
            result = s.execute(
                update(JobRow).where(self._owned(job_id, token)).values(heartbeat_at=now)
            )
            cancel = s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id))
        return _rowcount(result) == 1, bool(cancel)

    def cancel_requested(self, job_id: str) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))

    def update_progress(
        self,
        job_id: str,
        token: str,
        *,
        stage: str,
        done: int,
        total: int,
        percent: float,
        tiles_done: int | None = None,
        tiles_total: int | None = None,
    ) -> bool:
        """Write one progress report; False when the claim is no longer ours."""
        now = utcnow()
        values: dict[str, Any] = {
            "stage": stage,
            "stage_done": done,
            "stage_total": total,
            "percent": percent,
            "updated_at": now,
            "heartbeat_at": now,
        }
        if tiles_done is not None:
            values["tiles_done"] = tiles_done
        if tiles_total is not None:
            values["tiles_total"] = tiles_total
        with self.session() as s:
            result = s.execute(update(JobRow).where(self._owned(job_id, token)).values(**values))
        return _rowcount(result) == 1

    def finish(
        self,
        job_id: str,
        token: str,
        status: JobStatus,
        *,
        error: str | None = None,
        result_rel_path: str | None = None,
        result_info: dict[str, Any] | None = None,
    ) -> bool:
        """End the run this claim owns; False when someone else owns it by now."""
        now = utcnow()
        values: dict[str, Any] = {
            "status": status,
            "error": error,
            "finished_at": now,
            "updated_at": now,
            "claim": None,
        }
        if status == JobStatus.succeeded:
            values.update(stage="done", percent=100.0, result_rel_path=result_rel_path)
            values["result_info"] = result_info
        with self.session() as s:
            result = s.execute(update(JobRow).where(self._owned(job_id, token)).values(**values))
        return _rowcount(result) == 1
