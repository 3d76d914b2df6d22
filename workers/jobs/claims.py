"""The workers' side of the job store: claims, heartbeats, progress and outcome.

Every write here is one conditional ``UPDATE`` (``WHERE claim = <the worker's token>``),
so that a re-delivered message and a live worker racing on one job can never both win.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    and_,
    func,
    or_,
    select,
    update,
)

from workers.jobs.database import Database, rowcount
from workers.jobs.rows import (
    ACTIVE,
    TERMINAL,
    JobRow,
    JobStatus,
    utcnow,
)

log = logging.getLogger(__name__)


class ClaimOutcome(enum.StrEnum):
    claimed = "claimed"  # this worker now runs the job
    busy = "busy"  # another live worker runs it (a duplicate delivery)
    terminal = "terminal"  # already succeeded, failed or cancelled: nothing to do
    missing = "missing"  # no such job (deleted with its slide)


@dataclass(frozen=True)
class ClaimResult:
    outcome: ClaimOutcome
    job: JobRow | None = None


class WorkerClaims(Database):
    """Claiming a job and reporting on it, conditional on the claim's token."""

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
        if rowcount(result) == 1 and job.claim == token:
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
        return rowcount(result) == 1, bool(cancel)

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
        return rowcount(result) == 1

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
        return rowcount(result) == 1
