"""A split job's staging key on a real S3 server (workers/jobs/split_staging.py): what
``prepare`` uploads, what a part downloads and uploads back (only what it wrote, its
done marker last, never the record pointed at its own host), what the merge downloads,
and the sweep of a dead attempt's staging. The whole flow through real workers runs in
tests/service/test_multihost.py."""

from __future__ import annotations

import json
from pathlib import Path

from tests.s3server import S3Server
from workers.engine.staging import record_dir, relocate
from workers.jobs.split_staging import RemoteStaging, staging_key, stamps
from workers.storage.objects import Store
from workers.storage.publish import remove_unpublished

STATE = {"spec": {"slide_path": "/host-a/slides/s.dcm", "out_path": "/host-a/r/j.zarr",
                  "model_dir": "/host-a/models"},
         "slide_file": "/host-a/slides/s.dcm/inner/1.dcm", "batch_size": 8}


def _prepared(root: Path) -> Path:
    """A staged result as ``prepare`` leaves it: array metadata, no chunks; a record."""
    staged = root / ".j.zarr.partial-1234"
    (staged / "0").mkdir(parents=True)
    (staged / ".zgroup").write_text('{"zarr_format": 2}')
    (staged / ".zattrs").write_text('{"multiscales": []}')
    (staged / "0" / ".zarray").write_text('{"chunks": [64, 64]}')
    record = record_dir(staged)
    record.mkdir()
    (record / "state.json").write_text(json.dumps(STATE))
    (record / "tiles.npz").write_bytes(b"tiles" * 1000)
    return staged


def test_parts_meet_under_the_staging_key(s3_env: S3Server, tmp_path: Path) -> None:
    store = Store(f"s3://{s3_env.new_bucket()}/sp")
    remote = RemoteStaging.for_job(store, "job1", "a" * 32)
    assert remote.key == staging_key("job1", "a" * 32) == f"results/job1/.split-{'a' * 16}"
    assert remote.upload_prepared(_prepared(tmp_path / "host-a")) > 5000

    # a part on another host: the prepared files, pointed at its own paths
    staged = tmp_path / "host-b" / "part0" / ".j.zarr.partial-1234"
    got = remote.download_prepared(staged)
    assert sorted(p.relative_to(staged.parent).as_posix() for p in got) == [
        ".j.zarr.partial-1234.record/state.json", ".j.zarr.partial-1234.record/tiles.npz",
        ".j.zarr.partial-1234/.zattrs", ".j.zarr.partial-1234/.zgroup",
        ".j.zarr.partial-1234/0/.zarray"]
    relocate(staged, slide_path=Path("/host-b/cache/s.dcm"), out_path=staged.parent / "j.zarr",
             model_dir=None)
    meta = json.loads((record_dir(staged) / "state.json").read_text())
    assert meta["slide_file"] == "/host-b/cache/s.dcm/inner/1.dcm"  # inside the folder
    assert meta["spec"]["slide_path"] == "/host-b/cache/s.dcm"
    assert meta["spec"]["model_dir"] is None
    before = stamps(got)
    (staged / "0" / "0").mkdir()
    (staged / "0" / "0" / "1").write_bytes(b"chunk 0.1")  # the part's own chunk
    (record_dir(staged) / "part-0.json").write_text('{"index": 0}')
    remote.upload_part(staged, 0, before)
    result = store.list_files(f"{remote.key}/result")
    assert f"{remote.key}/result/0/0/1" in result and len(result) == 4
    # the relocated record stays this host's: the store keeps host a's
    stored = json.loads(store.get_bytes(f"{remote.key}/record/state.json"))
    assert stored["spec"]["slide_path"] == "/host-a/slides/s.dcm"
    assert store.exists(f"{remote.key}/record/part-0.json")

    # the merge gets everything (the manifest aside)
    merged = tmp_path / "host-c" / ".j.zarr.partial-1234"
    assert remote.download_all(merged) > 5000
    assert (merged / "0" / "0" / "1").read_bytes() == b"chunk 0.1"
    assert (record_dir(merged) / "part-0.json").is_file()
    assert not (merged / "manifest.json").exists()

    # a dead attempt's staging goes with the unpublished attempts; then deleting works
    assert remove_unpublished(store, "results/job1") == 1
    assert store.list_files("results/job1") == []
    remote.delete()  # nothing left: fine
