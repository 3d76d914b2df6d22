"""The job store: owners, slides, batches and jobs in a relational database.

SQLAlchemy 2 ORM over SQLite (the default, one file in the data dir) or PostgreSQL (by
URL). The API writes slides and queued jobs; workers claim jobs and write their state
and progress. Every state change is one conditional ``UPDATE`` (``WHERE status = ...``
and, for a worker, ``WHERE claim = <its token>``), so that two processes racing on one
job (a cancel against a start, a re-delivered message against a live worker) cannot
both win. Times are stored as naive UTC and handed out as aware UTC.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from workers.jobs.claims import WorkerClaims
from workers.jobs.rows import (
    ACTIVE,
    BatchRow,
    JobRow,
    JobStatus,
    Owner,
    SlideRow,
    new_id,
    utcnow,
)

log = logging.getLogger(__name__)


class JobStore(WorkerClaims):
    """Data access for the API and the workers; one instance per process is enough.

    The API's side (owners, slides, batches, jobs) is here; the workers' side (claims,
    heartbeats, progress, outcome) is :class:`workers.jobs.claims.WorkerClaims`.
    """

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
