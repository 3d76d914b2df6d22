"""Level-0 chunks go up to the store while the run makes them (workers/storage/streaming.py),
against a real S3 server (moto's server mode over HTTP): the chunks are in the store
before publishing starts, publishing uploads only the rest, and the published result is
the file:// run's, chunk for chunk; a failed chunk upload fails the publish."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.s3server import S3Server
from tests.workers.storage.trees import differences, tree
from workers.engine.run import run_engine
from workers.jobs.objects import ResultOutput, get_object_store, slide_path
from workers.jobs.rows import JobStatus, SlideRow, new_id
from workers.jobs.settings import Settings
from workers.jobs.store import JobStore
from workers.jobs.tasks import build_spec, execute_job
from workers.storage.errors import StorageError
from workers.storage.objects import Store
from workers.storage.publish import marker_key
from workers.storage.streaming import ChunkUploader
from wsi.array_slide import write_slide_from_array
from wsi.reader import Slide

log = logging.getLogger(__name__)

PARAMS = {"target_mpp": 1.0, "tile_px": 256, "overlap_px": 16}


@pytest.fixture(scope="module")
def small_svs(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> Path:
    """2048 x 2048 at 1 µm/px: glass with a block of real H&E (1024 x 1024)."""
    rng = np.random.default_rng(6)
    canvas = np.clip(rng.normal(236, 2.5, (2048, 2048, 3)), 0, 255).astype(np.uint8)
    canvas[256:1280, 512:1536] = cmu_rgb[:1024, :1024]
    path = tmp_path_factory.mktemp("streamed") / "small.svs"
    write_slide_from_array(path, canvas, mpp=1.0, downsamples=(1, 4), flavor="svs")
    return path


def _slide_row(path: Path) -> SlideRow:
    with Slide(path) as s:
        return SlideRow(
            id=new_id(), owner="alice", sha256=new_id() * 2, filename=path.name,
            size_bytes=path.stat().st_size, rel_path="slides/small.svs",
            width=s.dimensions[0], height=s.dimensions[1], level_count=s.level_count,
            level_dimensions=[list(d) for d in s.level_dimensions],
            level_downsamples=list(s.level_downsamples), mpp=s.mpp, vendor=s.vendor,
            backend=s.backend,
        )


def _level0(name: str) -> bool:
    """A level-0 chunk of the probabilities (``0/c/y/x``) or the class map
    (``labels/classes/0/y/x``), not the arrays' metadata (``0/.zarray``)."""
    for array, depth in (("0/", 3), ("labels/classes/0/", 2)):
        if name.startswith(array):
            parts = name[len(array):].split("/")
            return len(parts) == depth and all(p.isdigit() for p in parts)
    return False


def test_chunks_are_up_before_publishing_and_the_result_equals_the_file_run(
    s3_env: S3Server, small_svs: Path, job_db: JobStore, tmp_path: Path
) -> None:
    local = Settings(data_dir=tmp_path / "local", heartbeat_s=1.0)
    get_object_store(local).put_file(small_svs, "slides/small.svs")
    slide = _slide_row(small_svs)
    job_db.add_slide(slide)
    _, (local_job,) = job_db.create_jobs("alice", [slide.id], "identity", PARAMS, batch=False)
    assert execute_job(local_job.id, store=job_db, settings=local,
                       worker="test:1")["outcome"] == "succeeded"
    local_row = job_db.get_job(None, local_job.id)
    assert local_row is not None and local_row.status == JobStatus.succeeded
    assert local_row.result_rel_path is not None
    local_result = get_object_store(local).local_path(local_row.result_rel_path)
    assert ResultOutput.for_job(local, local_job.id, "t").chunk_stored() is None  # file://

    remote = Settings(data_dir=tmp_path / "worker", heartbeat_s=1.0,
                      storage_url=f"s3://{s3_env.new_bucket()}/sp")
    objects = get_object_store(remote)
    objects.put_file(small_svs, "slides/small.svs")
    _, (job,) = job_db.create_jobs("alice", [slide.id], "identity", PARAMS, batch=False)
    # what execute_job does around the engine, with a look at the store in between
    output = ResultOutput.for_job(remote, job.id, uuid.uuid4().hex)
    with slide_path(remote, slide, ranges=True) as path:
        spec = build_spec(job, remote, slide=path, out_path=output.out_path)
        run_engine(spec, chunk_stored=output.chunk_stored())
    key = output.attempt_key
    before = [k[len(key) + 1:] for k in objects.list_files(key)]
    assert before and all(_level0(n) for n in before), before  # chunks only, no metadata
    assert not objects.exists(marker_key(key))  # nothing looks published yet
    assert output.publish() == key
    done = output.published
    assert done is not None and objects.exists(marker_key(key))

    names = [k[len(key) + 1:] for k in objects.list_files(key)]
    level0 = [n for n in names if _level0(n)]
    assert any(n.startswith("labels/classes/0/") for n in level0)
    streamed_bytes = done.bytes - done.uploaded_bytes
    log.info("job %s: tree %d files, %d bytes; streamed during the run %d files, %d bytes; "
             "uploaded by publish() %d files, %d bytes", job.id, done.files, done.bytes,
             done.files - done.uploaded_files, streamed_bytes, done.uploaded_files,
             done.uploaded_bytes)
    assert done.files - done.uploaded_files == len(level0)  # every level-0 chunk, once
    assert 0 < done.uploaded_bytes < done.bytes
    local_names = [p.relative_to(local_result).as_posix()
                   for p in local_result.rglob("*") if p.is_file()]
    got = tree(names, lambda n: objects.get_bytes(f"{key}/{n}"))
    want = tree(local_names, lambda n: (local_result / n).read_bytes())
    assert differences(got, want) == []


def test_a_failed_chunk_upload_fails_at_the_end_and_leaves_nothing(s3_env: S3Server) -> None:
    bucket = s3_env.new_bucket()
    chunks = ChunkUploader(Store(f"s3://{bucket}-missing/sp"), "results/j/a.zarr",
                           threads=2, max_pending=2)
    for i in range(5):  # the bucket does not exist: every upload fails, none blocks
        chunks(f"0/0/0/{i}", b"x" * 10)
    with pytest.raises(StorageError):
        chunks.finish()
    good = Store(f"s3://{bucket}/sp")
    chunks = ChunkUploader(good, "results/j/b.zarr")
    chunks("0/0/0/0", b"chunk")
    chunks.abandon()  # the run failed: what was up is removed
    assert good.list_files("results/j/b.zarr") == []
