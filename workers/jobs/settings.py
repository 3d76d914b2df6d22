"""Configuration shared by the API and the workers (``SLIDEPIPE_*`` variables, ``.env``).

It lives in ``workers`` because the Celery app and the job store need it and
``workers`` may not import ``service``; ``workers.jobs.settings`` re-exports it.
"""

from __future__ import annotations

import hmac
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"

# -- the data dir's layout: every storage path is spelled here and nowhere else ----------
SLIDES_DIR, RESULTS_DIR, TMP_DIR, CACHE_DIR = "slides", "results", "tmp", "cache"


def slide_rel_path(slide_id: str, suffix: str) -> str:
    """Where an accepted upload lives, relative to the data dir."""
    return f"{SLIDES_DIR}/{slide_id}{suffix}"


def result_rel_path(job_id: str) -> str:
    """Where a job's published result lives, relative to the data dir."""
    return f"{RESULTS_DIR}/{job_id}.zarr"


class Settings(BaseSettings):
    """Every knob of the service; read once per process through :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="SLIDEPIPE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(default=Path("slidepipe-data"), description="slides, results, db")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite in the data dir"
    )
    broker_url: str = DEFAULT_BROKER_URL
    result_backend_url: str | None = Field(default=None, description="default: broker_url")
    api_keys: str = Field(default="", description="owner=key,owner2=key2")
    max_upload_bytes: int = Field(default=20 * 1024**3, gt=0)
    model_dir: Path | None = None
    #: Seconds before Redis hands an unacknowledged message back (a backstop: the
    #: reconciler resumes a dead worker's job from its stopped heartbeat much sooner). A
    #: job running longer is delivered again too; that copy finds the live claim, waits
    #: at most ``stale_after_s`` and drops (docs/robustness.md).
    broker_visibility_timeout_s: float = Field(default=3600, gt=0)
    broker_restore_interval_s: int = Field(default=10, ge=1)
    #: How often a running job proves it is alive; a claim older than
    #: ``heartbeat_s * stale_after_heartbeats`` may be taken over by another worker.
    heartbeat_s: float = Field(default=5.0, gt=0)
    stale_after_heartbeats: int = Field(default=3, ge=2)
    #: Minimum seconds between two progress writes of one job (stage changes always write).
    progress_interval_s: float = Field(default=0.5, ge=0)
    #: How often an event stream (SSE) looks at its job in the store.
    events_poll_s: float = Field(default=0.5, gt=0, le=10)
    worker_device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    # -- the browser viewer (docs/outputs.md) ---------------------------------------------
    #: Key of the viewer's signed links (an HMAC over job, owner and expiry); default:
    #: derived from ``api_keys``, so rotating the keys also revokes every link.
    viewer_link_key: str = Field(default="", repr=False)
    viewer_link_ttl_s: int = Field(default=3600, ge=60, le=7 * 86400)
    #: OpenSeadragon's build folder (npm package ``openseadragon``); default: the
    #: checkout's ``node_modules`` (scripts/setup.sh), or the Docker image's.
    openseadragon_dir: Path | None = None
    # -- robustness bounds (docs/robustness.md) ------------------------------------------
    #: An upload may declare at most this many level-0 pixels, levels, and pixels per
    #: byte of file (a decompression bomb declares 10^5 and more); checking its pixels
    #: may take at most ``upload_check_s`` (a bounded number of tiles is decoded).
    max_slide_pixels: float = Field(default=4e10, gt=0)
    max_slide_levels: int = Field(default=32, ge=1)
    max_pixels_per_byte: float = Field(default=5000.0, gt=0)
    upload_check_s: float = Field(default=10.0, gt=0)
    #: A job may plan at most this many tiles (before tissue selection).
    max_tiles_per_job: int = Field(default=1_000_000, ge=1)
    #: Request bodies other than slide uploads (JSON) above this answer 413.
    max_body_bytes: int = Field(default=1024**2, ge=1024)
    #: How often a worker's reconciler re-queues jobs the broker lost (0: never).
    reconcile_interval_s: float = Field(default=15.0, ge=0)
    # -- storage (docs/storage.md) -------------------------------------------------------
    #: Where slides and results live: ``file:///...`` or ``s3://bucket/prefix`` (AWS_*
    #: environment for credentials and AWS_ENDPOINT_URL); default: the data dir itself.
    storage_url: str = Field(default="", description="file:///... | s3://bucket/prefix")
    #: The local read-through cache of store objects (slides for openslide, results the
    #: API serves); default ``<data_dir>/cache/objects``. Bounded by ``cache_bytes``.
    object_cache_dir: Path | None = Field(
        default=None, validation_alias=AliasChoices("SLIDEPIPE_CACHE_DIR", "object_cache_dir")
    )
    cache_bytes: int = Field(default=50 * 1024**3, gt=0)
    #: A worker's private folder for results being made; default ``<data_dir>/scratch``.
    scratch_dir: Path | None = None
    #: How a worker reads a TIFF-based slide from a remote store: ``range`` (byte ranges
    #: through tiffslide) or ``cache`` (download it whole once, through the cache).
    remote_slide_reads: str = Field(default="range", pattern="^(range|cache)$")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("object_cache_dir", "scratch_dir")
    @classmethod
    def _absolute_or_none(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    # -- derived ------------------------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'slidepipe.db'}"

    @property
    def effective_result_backend_url(self) -> str:
        return self.result_backend_url or self.broker_url

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or self.data_dir.as_uri()

    @property
    def effective_object_cache_dir(self) -> Path:
        return self.object_cache_dir or self.data_dir / CACHE_DIR / "objects"

    @property
    def effective_scratch_dir(self) -> Path:
        return self.scratch_dir or self.data_dir / "scratch"

    @property
    def stale_after_s(self) -> float:
        return self.heartbeat_s * self.stale_after_heartbeats

    @property
    def slides_dir(self) -> Path:
        return self.data_dir / SLIDES_DIR

    @property
    def results_dir(self) -> Path:
        return self.data_dir / RESULTS_DIR

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / TMP_DIR

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / CACHE_DIR

    def ensure_dirs(self) -> None:
        """Create the data dir layout (idempotent)."""
        for path in (self.slides_dir, self.results_dir, self.tmp_dir, self.cache_dir):
            path.mkdir(parents=True, exist_ok=True)

    def api_key_owners(self) -> dict[str, str]:
        """``{key: owner}`` parsed from ``api_keys`` (``owner=key,owner2=key2``)."""
        owners: dict[str, str] = {}
        for item in self.api_keys.split(","):
            item = item.strip()
            if not item:
                continue
            owner, sep, key = item.partition("=")
            owner, key = owner.strip(), key.strip()
            if not sep or not owner or not key:
                raise ValueError(
                    "SLIDEPIPE_API_KEYS must look like 'owner=key,owner2=key2'; "
                    f"got an entry without owner or key: {item.split('=')[0]!r}=..."
                )
            owners[key] = owner
        return owners

    def owner_for_key(self, key: str) -> str | None:
        """The owner of ``key`` (constant-time comparison against every known key)."""
        found: str | None = None
        for known, owner in self.api_key_owners().items():
            if hmac.compare_digest(known.encode(), key.encode()):
                found = owner
        return found


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached: environment is read once)."""
    return Settings()
