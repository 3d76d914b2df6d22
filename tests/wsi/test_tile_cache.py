"""The tiled-TIFF fast path of the tiffslide backend against tiffslide itself.

The reference is tiffslide's own ``read_region`` (zarr over tifffile), opened here
independently: the fast path must return the same bytes, decode each slide tile once
however many threads and overlapping regions ask for it, stay within its byte budget,
and leave layouts it does not handle (strips) to tiffslide.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tiffslide

from tests.data import BuiltSlide
from wsi.backends import TiffSlideBackend
from wsi.errors import RegionUnreadable
from wsi.reader import Slide
from wsi.tile_cache import DecodedTileCache


def _tiffslide_region(path: Path, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    with tiffslide.TiffSlide(str(path)) as ts:
        ds = ts.level_downsamples[level]
        x0, y0 = math.ceil(x * ds - 1e-9), math.ceil(y * ds - 1e-9)
        return np.asarray(ts.read_region((x0, y0), level, (w, h), as_array=True))


@pytest.mark.parametrize("fixture", ["tissue_svs", "tissue_generic_tiff", "lossless_tissue_svs"])
def test_tiled_reads_equal_tiffslide_at_every_level(fixture: str,
                                                    request: pytest.FixtureRequest) -> None:
    built: BuiltSlide = request.getfixturevalue(fixture)
    backend = TiffSlideBackend(built.path)
    try:
        levels = len(backend.level_dimensions)
        assert all(backend._tiled.covers(level) for level in range(levels)), "fast path unused"
        assert backend.concurrent_reads
        rng = np.random.default_rng(7)
        for level in range(levels):
            lw, lh = backend.level_dimensions[level]
            boxes = [(0, 0, min(lw, 300), min(lh, 300)), (lw - 1, lh - 1, 1, 1)]  # corners
            for _ in range(12):
                w, h = int(rng.integers(1, min(lw, 700))), int(rng.integers(1, min(lh, 700)))
                boxes.append((int(rng.integers(0, lw - w + 1)), int(rng.integers(0, lh - h + 1)),
                              w, h))
            for x, y, w, h in boxes:
                got = backend.read(x, y, level, w, h)
                want = _tiffslide_region(built.path, level, x, y, w, h)
                assert got.shape == want.shape == (h, w, 3)
                np.testing.assert_array_equal(got, want, err_msg=f"level {level} {x},{y} {w}x{h}")
    finally:
        backend.close()


def test_each_slide_tile_is_decoded_once_across_threads(tissue_svs: BuiltSlide) -> None:
    """256 px regions every 224 px (the engine's overlap) from 4 threads through one
    handle: every slide tile they touch is decoded exactly once."""
    tile = 256
    with Slide(tissue_svs.path, backend="tiffslide") as slide:
        assert slide.concurrent_reads
        width, height = 1600, 1200
        origins = [(x, y) for y in range(0, height - tile, 224) for x in range(0, width - tile, 224)]
        cache: DecodedTileCache = slide._backend._tiled.cache  # type: ignore[attr-defined]
        cache.clear()  # opening decoded a pixel of every level
        before = cache.decodes
        with ThreadPoolExecutor(4) as pool:
            regions = list(pool.map(lambda o: slide.read_level(0, o[0], o[1], tile, tile), origins))
        decodes = cache.decodes - before
        reference = slide.read_level(0, 0, 0, width, height)
    slide_tile = 256  # write_slide_from_array's tile size
    touched = {(y // slide_tile, x // slide_tile) for ox, oy in origins
               for y in (oy, oy + tile - 1) for x in (ox, ox + tile - 1)}
    assert decodes == len(touched)
    for (x, y), region in zip(origins, regions, strict=True):
        np.testing.assert_array_equal(region, reference[y : y + tile, x : x + tile])


def test_cache_stays_within_its_byte_budget() -> None:
    cache = DecodedTileCache(max_bytes=10_000)
    for key in range(50):
        tile = cache.get((0, key), lambda: np.zeros((40, 40, 3), np.uint8))  # 4,800 bytes
        assert not tile.flags.writeable  # shared between readers: nobody may change it
        assert cache.bytes <= 10_000
    assert cache.decodes == 50
    cache.get((0, 49), lambda: pytest.fail("the newest tile was evicted"))


def test_a_failed_decode_is_not_cached() -> None:
    cache = DecodedTileCache()
    calls = []

    def failing() -> np.ndarray:
        calls.append(1)
        raise RegionUnreadable("corrupt")

    for _ in range(2):
        with pytest.raises(RegionUnreadable):
            cache.get((0, 0), failing)
    assert len(calls) == 2 and cache.bytes == 0


def test_stripped_tiff_stays_with_tiffslide(stripped_tiff: Path) -> None:
    backend = TiffSlideBackend(stripped_tiff)
    try:
        assert not backend._tiled.covers(0)
        assert not backend.concurrent_reads  # tiffslide's own reads share a file position
        region = backend.read(10, 20, 0, 50, 40)
        np.testing.assert_array_equal(region, _tiffslide_region(stripped_tiff, 0, 10, 20, 50, 40))
    finally:
        backend.close()
