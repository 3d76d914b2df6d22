"""Request and response bodies of the REST API (the OpenAPI schema is built from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.jobs.actions import MAX_JOBS_PER_BATCH
from workers.jobs.params import JobParams
from workers.jobs.rows import JobStatus, as_utc


class _FromRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_validator(
        "created_at", "started_at", "finished_at", "updated_at", mode="before", check_fields=False
    )
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return as_utc(value) if isinstance(value, datetime) else value


class SlideOut(_FromRow):
    id: str
    filename: str = Field(description="the uploaded file's name, a label only")
    sha256: str
    size_bytes: int
    width: int = Field(description="level-0 width in pixels")
    height: int
    level_count: int
    level_dimensions: list[list[int]]
    level_downsamples: list[float]
    mpp: float | None = Field(description="level-0 µm/px; null when the file declares none")
    vendor: str
    backend: str
    created_at: datetime


class SlideList(BaseModel):
    items: list[SlideOut]
    total: int
    limit: int
    offset: int


class JobOut(_FromRow):
    id: str
    slide_id: str
    batch_id: str | None
    model: str
    params: dict[str, Any]
    status: JobStatus
    stage: str | None
    stage_done: int
    stage_total: int
    tiles_done: int
    tiles_total: int
    percent: float
    error: str | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    result_info: dict[str, Any] | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="what to know about a finished run, e.g. that no tissue was found and "
        "nothing was analysed (also in result_info.warnings and the result's provenance)",
    )
    links: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _warnings_from_result(self) -> JobOut:
        if not self.warnings and self.result_info:
            found = self.result_info.get("warnings")
            if isinstance(found, list):
                self.warnings = [str(w) for w in found]
        return self


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    slide_id: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=255, description="a model card name")
    parameters: JobParams = Field(default_factory=JobParams)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    slide_ids: list[str] = Field(min_length=1, max_length=MAX_JOBS_PER_BATCH)
    model: str = Field(min_length=1, max_length=255, description="a model card name")
    parameters: JobParams = Field(default_factory=JobParams)


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatus
    links: dict[str, str]


class BatchAccepted(BaseModel):
    batch_id: str
    job_ids: list[str]
    links: dict[str, str]


class BatchOut(BaseModel):
    id: str
    model: str
    params: dict[str, Any]
    created_at: datetime
    job_ids: list[str]
    counts: dict[str, int] = Field(description="jobs per status")
    percent: float = Field(description="mean progress of the batch's jobs")
