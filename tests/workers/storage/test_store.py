"""The store behind SLIDEPIPE_STORAGE_URL, against a real S3 server (moto's server mode in
a subprocess, over HTTP) and the local file system: zero-cost file://, streamed S3 I/O
with byte counters, the read-through cache's bound and pins, atomic result publishing,
remote slides read by byte ranges, and one job run end to end on each store."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.s3server import S3Server
from tests.workers.storage.trees import differences, tree
from workers.jobs.objects import get_object_store
from workers.jobs.rows import JobStatus, SlideRow, new_id
from workers.jobs.settings import Settings
from workers.jobs.store import JobStore
from workers.jobs.tasks import execute_job
from workers.storage.cache import ReadThroughCache
from workers.storage.errors import StorageError
from workers.storage.objects import Store
from workers.storage.publish import find_published, marker_key, publish_tree, remove_unpublished
from wsi.array_slide import write_slide_from_array
from wsi.errors import SlideUnreadable
from wsi.reader import Slide
from wsi.remote import REMOTE_BYTES, recorded_sha256, write_slide_ref

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def banded_svs(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> Path:
    """4096 x 4096 at 1 µm/px, JPEG tiles: glass with a scanner's noise, and one block of
    real H&E (1024 x 1024, 6% of the area) — tissue on a small part, as in most scans."""
    rng = np.random.default_rng(20)
    canvas = np.clip(rng.normal(236, 2.5, (4096, 4096, 3)), 0, 255).astype(np.uint8)
    canvas[512:1536, 2048:3072] = cmu_rgb[:1024, :1024]
    path = tmp_path_factory.mktemp("banded") / "glass.svs"
    write_slide_from_array(path, canvas, mpp=1.0, downsamples=(1, 4, 16), flavor="svs")
    return path


@pytest.fixture
def s3_store(s3_env: S3Server) -> Store:
    return Store(f"s3://{s3_env.new_bucket()}/slidepipe")


# -- file:// ---------------------------------------------------------------------------
def test_file_store_is_the_data_dir_and_moves_without_copying(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    store = get_object_store(settings)
    assert store.is_local and store.local_path("slides/a.svs") == tmp_path / "data/slides/a.svs"
    source = tmp_path / "upload.part"
    source.write_bytes(b"x" * 1000)
    inode = source.stat().st_ino
    store.put_file(source, "slides/a.svs", move=True)
    placed = tmp_path / "data/slides/a.svs"
    assert placed.stat().st_ino == inode and not source.exists()  # a rename, no copy
    cache = ReadThroughCache(store, tmp_path / "cache", max_bytes=10)
    with cache.local("slides/a.svs") as path:
        assert path == placed  # the file itself, never a cached copy
    assert cache.downloads == 0


def test_bad_urls_and_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="file:///"):
        Store("ftp://host/x")
    with pytest.raises(StorageError, match="bucket"):
        Store("s3:///prefix")
    with pytest.raises(StorageError, match="invalid storage key"):
        Store(tmp_path.as_uri()).local_path("slides/../../etc/passwd")


# -- s3:// -----------------------------------------------------------------------------
def test_s3_streams_files_and_counts_bytes(s3_store: Store, tmp_path: Path) -> None:
    payload = os.urandom(9 << 20)  # over one 8 MiB chunk: a multipart upload of 2 parts
    source = tmp_path / "big.bin"
    source.write_bytes(payload)
    written0, read0 = s3_store.bytes_written, s3_store.bytes_read
    assert s3_store.put_file(source, "slides/big.bin") == len(payload)
    s3_store.put_bytes("slides/folder/a.dcm", b"a")
    s3_store.put_bytes("slides/folder/sub/b.dcm", b"bb")
    assert s3_store.bytes_written - written0 == len(payload) + 3
    assert s3_store.list_files("slides/folder") == ["slides/folder/a.dcm",
                                                    "slides/folder/sub/b.dcm"]
    back = tmp_path / "back.bin"
    assert s3_store.get_file("slides/big.bin", back) == len(payload)
    assert back.read_bytes() == payload
    assert s3_store.bytes_read - read0 == len(payload)
    s3_store.delete("slides/folder")
    assert s3_store.list_files("slides/folder") == [] and s3_store.exists("slides/big.bin")
    s3_store.delete("slides/big.bin")
    assert not s3_store.exists("slides/big.bin")


def test_cache_downloads_once_evicts_lru_and_never_an_entry_in_use(
    s3_store: Store, tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        s3_store.put_bytes(f"slides/{name}.svs", name.encode() * 400)  # 400 bytes each
    s3_store.put_bytes("slides/d/x.dcm", b"d" * 300)  # a folder entry (an archive's slide)
    cache = ReadThroughCache(s3_store, tmp_path / "cache", max_bytes=1000)
    with cache.local("slides/a.svs") as a_path:
        assert a_path.read_bytes() == b"a" * 400
        with cache.local("slides/a.svs"):  # a second user of the same entry: no download
            pass
        assert cache.downloads == 1
        os.utime(cache._lock_path("slides/a.svs"), (1, 1))  # a is the oldest entry...
        with cache.local("slides/b.svs"):
            pass
        with cache.local("slides/c.svs"):
            pass  # 1200 bytes > 1000, but a is in use: b (next oldest) goes instead
        assert a_path.is_file(), "an entry in use was evicted"
        assert not (cache.root / "slides/b.svs").exists()
    with cache.local("slides/d") as folder:
        assert (folder / "x.dcm").read_bytes() == b"d" * 300
    # now nothing is pinned: a (oldest) is evicted to make room for the folder
    assert not a_path.exists()
    assert cache.size_bytes() <= 1000
    assert cache.downloads == 4
    with cache.local("slides/c.svs") as c_path:
        assert not cache.discard("slides/c.svs") and c_path.exists()  # in use: kept
    assert cache.discard("slides/c.svs") and not c_path.exists()


def test_cache_fetches_an_entry_once_for_concurrent_users(s3_store: Store, tmp_path: Path) -> None:
    s3_store.put_bytes("slides/s.svs", b"s" * 50_000)
    caches = [ReadThroughCache(s3_store, tmp_path / "cache", max_bytes=1 << 20) for _ in range(4)]
    seen: list[bytes] = []

    def use(cache: ReadThroughCache) -> None:
        with cache.local("slides/s.svs") as path:
            seen.append(path.read_bytes())

    threads = [threading.Thread(target=use, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [b"s" * 50_000] * 4
    assert sum(c.downloads for c in caches) == 1


def test_publish_is_marked_last_and_unfinished_attempts_are_removed(
    s3_store: Store, tmp_path: Path
) -> None:
    result = tmp_path / "r.zarr"
    (result / "0" / "0").mkdir(parents=True)
    (result / ".zattrs").write_text("{}")
    (result / "0" / "0" / "0.0").write_bytes(b"chunk")
    s3_store.put_bytes("results/job1/dead.zarr/.zattrs", b"{}")  # died mid-upload
    assert find_published(s3_store, "results/job1") is None
    assert remove_unpublished(s3_store, "results/job1") == 1
    done = publish_tree(s3_store, result, "results/job1/live.zarr")
    assert done.files == 2 and done.bytes == 7
    assert s3_store.exists(marker_key("results/job1/live.zarr"))
    assert find_published(s3_store, "results/job1") == "results/job1/live.zarr"
    assert remove_unpublished(s3_store, "results/job1") == 0
    assert s3_store.list_files("results/job1/live.zarr") == [
        "results/job1/live.zarr/.zattrs", "results/job1/live.zarr/0/0/0.0"]


def test_a_remote_slide_reads_the_same_pixels_as_the_local_file(
    s3_store: Store, banded_svs: Path, tmp_path: Path
) -> None:
    s3_store.put_file(banded_svs, "slides/banded.svs")
    ref = write_slide_ref(tmp_path / "glass.svs", s3_store.url_of("slides/banded.svs"))
    with Slide(banded_svs) as local, Slide(ref) as remote:
        assert remote.backend == "tiffslide" and remote.dimensions == local.dimensions
        for level, (x, y) in ((0, (1500, 300)), (1, (100, 200)), (2, (0, 0))):
            assert np.array_equal(remote.read_level(level, x, y, 300, 200),
                                  local.read_level(level, x, y, 300, 200))
    assert recorded_sha256(ref) is None  # none recorded for this one
    sha = hashlib.sha256(banded_svs.read_bytes()).hexdigest()
    ref = write_slide_ref(tmp_path / "glass.svs", s3_store.url_of("slides/banded.svs"), sha)
    assert recorded_sha256(ref) == sha and recorded_sha256(banded_svs) is None
    with pytest.raises(SlideUnreadable, match="not in the store"):
        Slide(s3_store.url_of("slides/missing.svs"))
    s3_store.put_bytes("slides/text.svs", b"not a slide at all")
    with pytest.raises(SlideUnreadable, match="not a TIFF"):
        Slide(s3_store.url_of("slides/text.svs"))


# -- one job on each store ---------------------------------------------------------------
def _slide_row(path: Path, rel_path: str) -> SlideRow:
    with Slide(path) as s:
        return SlideRow(
            id=new_id(), owner="alice", sha256=new_id() * 2, filename=path.name,
            size_bytes=path.stat().st_size, rel_path=rel_path, width=s.dimensions[0],
            height=s.dimensions[1], level_count=s.level_count,
            level_dimensions=[list(d) for d in s.level_dimensions],
            level_downsamples=list(s.level_downsamples), mpp=s.mpp, vendor=s.vendor,
            backend=s.backend,
        )


def _run_job(db: JobStore, settings: Settings, slide: SlideRow) -> str:
    db.add_slide(slide)
    _, (job,) = db.create_jobs("alice", [slide.id], "identity",
                               {"target_mpp": 1.0, "tile_px": 256, "overlap_px": 16},
                               batch=False)
    outcome = execute_job(job.id, store=db, settings=settings, worker="test:1")
    assert outcome["outcome"] == "succeeded", outcome
    return job.id


def test_a_job_reads_its_slide_by_ranges_and_publishes_the_same_result(
    s3_env: S3Server, banded_svs: Path, job_db: JobStore, tmp_path: Path
) -> None:
    """One job on a file:// store and the same job on s3://, where the worker has its
    own scratch folder and reads the slide by byte ranges: the results are equal file
    for file, and the bytes read are a fraction of the slide (tissue is ~6% of it)."""
    local = Settings(data_dir=tmp_path / "local", heartbeat_s=1.0)
    local_store = get_object_store(local)
    local_store.put_file(banded_svs, "slides/banded.svs")
    local_job = _run_job(job_db, local, _slide_row(banded_svs, "slides/banded.svs"))
    local_result = local_store.local_path(job_db.get_job(None, local_job).result_rel_path)

    url = f"s3://{s3_env.new_bucket()}/sp"
    remote = Settings(data_dir=tmp_path / "worker", storage_url=url, heartbeat_s=1.0)
    objects = get_object_store(remote)
    objects.put_file(banded_svs, "slides/banded.svs")
    read_before, remote_before = objects.bytes_read, REMOTE_BYTES.total
    remote_job = _run_job(job_db, remote, _slide_row(banded_svs, "slides/banded.svs"))
    slide_bytes = banded_svs.stat().st_size
    ranged = REMOTE_BYTES.total - remote_before
    log.info("bytes read from the store for one job: %d of a %d-byte slide (%.1f%%)",
             ranged, slide_bytes, 100 * ranged / slide_bytes)
    assert objects.bytes_read - read_before == ranged  # nothing downloaded whole
    assert 0 < ranged < 0.5 * slide_bytes, (ranged, slide_bytes)

    row = job_db.get_job(None, remote_job)
    assert row.status == JobStatus.succeeded
    key = row.result_rel_path
    assert key.startswith(f"results/{remote_job}/") and objects.exists(key.replace(
        ".zarr", ".published"))
    assert not (remote.effective_scratch_dir / "results" / f"{remote_job}.zarr").exists()
    names = [k[len(key) + 1:] for k in objects.list_files(key)]
    local_names = [p.relative_to(local_result).as_posix()
                   for p in local_result.rglob("*") if p.is_file()]
    got = tree(names, lambda n: objects.get_bytes(f"{key}/{n}"))
    want = tree(local_names, lambda n: (local_result / n).read_bytes())
    assert differences(got, want) == []
