"""Shared helpers for the benchmark scripts: slides, timing, peak RSS, tables."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Generated slides, cards and scratch results: ``$SLIDEPIPE_BENCH_CACHE``, else
    ``$XDG_CACHE_HOME/slidepipe-bench`` (``~/.cache/slidepipe-bench``).

    Why not the system temp folder: the cache holds a few GB (the 20k px blend image as
    .npy is 1.2 GB), which a RAM-backed /tmp may not, and it is worth keeping between
    runs. How fast a folder creates files varies (0.06-1 ms per chunk file on the
    development VM, by folder and by minute); ``file_create_ms`` measures it.
    """
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slidepipe-bench"
    path = Path(os.environ.get("SLIDEPIPE_BENCH_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ram_dir() -> Path | None:
    """A RAM-backed folder (``/dev/shm``) when this machine has a writable one."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


@contextmanager
def scratch(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A fresh folder under ``parent`` (default :func:`cache_dir`) for one run's result,
    removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent or cache_dir()))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def settle_disk() -> None:
    """Flush dirty pages before a timed run that writes, so that it does not pay for
    the writeback of the previous run's result (hundreds of MB for an 8k+ slide)."""
    os.sync()


def file_create_ms(folder: Path, n: int = 200, size: int = 200_000) -> float:
    """Milliseconds to create and write one ``size``-byte file in ``folder``: what each
    stored chunk pays on top of encoding, printed beside the engine's rates."""
    payload = os.urandom(size)
    with scratch("probe-", folder) as probe:
        start = time.perf_counter()
        for i in range(n):
            (probe / str(i)).write_bytes(payload)
        return (time.perf_counter() - start) / n * 1e3


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    """The median of ``repeats`` calls: single runs on a shared 2-core VM vary by ~10%."""
    return statistics.median(measure() for _ in range(max(1, repeats)))


def real_tissue_slide(size_px: int, flavor: str = "svs") -> Path:
    """Real H&E (cmu_small_region, mirrored) as a JPEG pyramidal slide, cached."""
    from workers.demo.sample_data import fetch_cmu_small_region
    from wsi.array_slide import write_slide_from_array
    from wsi.reader import Slide

    path = cache_dir() / f"cmu-mirrored-{size_px}.{'svs' if flavor == 'svs' else 'tiff'}"
    if not path.is_file():
        with Slide(fetch_cmu_small_region()) as slide:
            rgb = slide.read_level(0, 0, 0, *slide.dimensions)
        partial = path.with_name(path.name + ".partial")
        write_slide_from_array(partial, rgb, mpp=0.5, width=size_px, height=size_px, flavor=flavor)
        partial.rename(path)
    return path


def banded_slide(size_px: int, tissue_fraction: float = 0.1, mpp: float = 0.5) -> Path:
    """A mostly-background slide with tissue bands, cached."""
    from tests.scenes import write_banded_slide

    path = cache_dir() / f"banded-{size_px}-{tissue_fraction:g}-{mpp:g}.svs"
    if not path.is_file():
        partial = path.with_name(path.name + ".partial")
        write_banded_slide(partial, width=size_px, height=size_px, tissue_fraction=tissue_fraction,
                           mpp=mpp)
        partial.rename(path)
    return path


def run_child(args: Sequence[str]) -> tuple[dict, int]:
    """Run ``python -m <args>`` in a fresh process; return its JSON stdout and peak RSS (bytes).

    ru_maxrss of RUSAGE_CHILDREN is the max over *all* children so far, so each
    measurement runs behind its own intermediate process that reports only its child.
    """
    probe = (
        "import json,resource,subprocess,sys;"
        "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
        "sys.stderr.write(p.stderr);"
        "print(json.dumps({'rc':p.returncode,'out':p.stdout,"
        "'maxrss_kb':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, *args],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise RuntimeError(f"child {args} failed (rc {report['rc']}): {done.stderr[-2000:]}")
    return json.loads(report["out"].strip().splitlines()[-1]), report["maxrss_kb"] * 1024


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
