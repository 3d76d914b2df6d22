"""The store pool: chunks stored concurrently, each once, never more than a bound
queued; blending on several threads stores the same result as on one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from workers.engine.chunk_writer import BackgroundSink
from workers.engine.result_layout import DenseSink
from workers.engine.run import run_engine
from workers.engine.spec import RunSpec
from wsi.ome_zarr import ChannelSpec, LabelSpec, ResultWriter


class SlowSink:
    """Takes a few ms per chunk (as encoding and writing one does) and records how many
    chunks were in its hands at once."""

    def __init__(self, seconds: float = 0.005, gate: threading.Event | None = None) -> None:
        self.seconds, self.gate = seconds, gate
        self.lock = threading.Lock()
        self.active = self.peak = 0
        self.stored: list[tuple[int, int]] = []
        self.threads: set[str] = set()

    def __call__(self, cy: int, cx: int, sums: np.ndarray, weights: np.ndarray) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1
            self.stored.append((cy, cx))


def test_pool_stores_every_chunk_once_on_several_threads() -> None:
    sink = SlowSink()
    store = BackgroundSink(sink, workers=3, max_pending=4)
    keys = [(cy, cx) for cy in range(6) for cx in range(8)]
    start = time.perf_counter()
    for cy, cx in keys:
        store(cy, cx, np.zeros((1, 2, 2), np.float32), np.ones((2, 2), np.float32))
    store.close()
    elapsed = time.perf_counter() - start
    assert sorted(sink.stored) == keys
    assert sink.peak == 3 and len(sink.threads) == 3  # three at once, never more
    assert store.chunks == len(keys)
    assert store.busy_s >= len(keys) * sink.seconds * 0.9
    assert store.wait_s > 0  # 48 chunks through 4 slots: the caller waited
    assert elapsed < len(keys) * sink.seconds  # faster than one thread could be


def test_pending_chunks_are_bounded() -> None:
    """The caller blocks once ``max_pending`` chunks are queued or being stored."""
    gate = threading.Event()  # nothing finishes storing until it is set
    sink = SlowSink(0.001, gate)
    store = BackgroundSink(sink, workers=2, max_pending=3)
    handed = threading.Event()

    def produce() -> None:
        for i in range(4):
            store(0, i, np.zeros((1, 1, 1), np.float32), np.ones((1, 1), np.float32))
        handed.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert not handed.wait(0.3), "a fourth chunk was accepted with three pending"
    assert sink.active == 2  # both threads hold a chunk; the third waits in the queue
    gate.set()
    assert handed.wait(5)
    producer.join()
    store.close()
    assert len(sink.stored) == 4


def test_storing_errors_come_back_from_close() -> None:
    def failing(cy: int, cx: int, sums: np.ndarray, weights: np.ndarray) -> None:
        if (cy, cx) == (1, 1):
            raise OSError("disk full")

    store = BackgroundSink(failing, workers=2)
    with pytest.raises(OSError, match="disk full"):
        for cy in range(3):
            for cx in range(3):
                store(cy, cx, np.zeros((1, 1, 1), np.float32), np.ones((1, 1), np.float32))
        store.close()
    store.close()  # closing again after a failure is harmless


def test_concurrent_dense_stores_write_the_same_files_as_one_thread(tmp_path: Path) -> None:
    """The real chunk sink (class map, uint8 conversion, Blosc, file writes) on a pool
    of four threads: every chunk file byte for byte what one thread writes."""
    rng = np.random.default_rng(0)
    size, n = 32, 5
    chunks = {(cy, cx): (rng.random((3, size, size), dtype=np.float32),
                         rng.uniform(0.5, 2, (size, size)).astype(np.float32))
              for cy in range(n) for cx in range(n)}
    for workers in (1, 4):
        writer = ResultWriter(tmp_path / f"{workers}.zarr", height=size * n, width=size * n,
                              mpp=1.0, chunk_px=size)
        image = writer.create_image("", "p", [ChannelSpec(str(i), "FF0000") for i in range(3)])
        label = writer.create_label(LabelSpec("classes", {i + 1: (str(i), (255, 0, 0, 255))
                                                          for i in range(3)}))
        store = BackgroundSink(DenseSink(writer.chunk_files(image), 1.0,
                                         writer.chunk_files(label)), workers=workers)
        for (cy, cx), (sums, weights) in chunks.items():
            store(cy, cx, sums, weights)
        store.close()
    one = sorted(p.relative_to(tmp_path / "1.zarr") for p in (tmp_path / "1.zarr").rglob("*")
                 if p.is_file() and p.parent.name.isdigit())
    assert len(one) >= 2 * n * n
    for path in one:
        assert (tmp_path / "4.zarr" / path).read_bytes() == (tmp_path / "1.zarr" / path).read_bytes()


def test_blending_threads_store_the_same_result(engine_slides: dict[str, Path],
                                                tmp_path: Path) -> None:
    """Blending split over three threads (by chunk column, each chunk summed in tile
    order on one thread) stores every array bit for bit as one blending thread does."""
    common = {"slide_path": engine_slides["svs"], "model": "identity", "device": "cpu",
              "tile_px": 128, "overlap_px": 32, "chunk_px": 128}
    for threads in (1, 3):
        run_engine(RunSpec(out_path=tmp_path / f"{threads}.zarr",
                           extra={"blend_threads": threads}, **common))  # type: ignore[arg-type]
    one, three = (zarr.open_group(str(tmp_path / f"{n}.zarr"), mode="r") for n in (1, 3))
    for name in ("0", "labels/classes/0", "labels/tissue/0"):
        expected = np.asarray(one[name])
        assert expected.any()
        np.testing.assert_array_equal(np.asarray(three[name]), expected, err_msg=name)
