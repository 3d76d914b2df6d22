"""Slides that live in an object store, read by byte ranges instead of being downloaded.

A worker on a host without the shared disk opens a slide by URL (``s3://bucket/key``,
or any fsspec URL): tifffile parses the directories through one buffered handle with
small read-ahead blocks, and the tile reader then fetches each tile's bytes with one
ranged request (``cat_file(start, end)``, stateless, so any thread may call it). Only
the tiles a job asks for cross the network; the bytes fetched are counted
(:data:`REMOTE_BYTES`), the figure docs/storage.md reports against the slide's size.

Inside the engine a remote slide travels as a *slide reference*: a tiny local JSON file
under the slide's own name (recognised by its first bytes, :data:`SLIDEREF_MAGIC`)
naming the URL, so that every path-typed field of a run stays a path and every message
names the slide as on a shared disk; :class:`wsi.reader.Slide` opens the URL it names. Credentials never go in
the file: fsspec/s3fs read them from the standard environment (``AWS_*``).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import threading
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

from wsi.errors import SlideUnreadable

#: How a local file naming a remote slide begins (see the module docstring).
SLIDEREF_MAGIC = b'{"slidepipe_slideref": 1'
MAX_SLIDEREF_BYTES = 16 * 1024
#: Blocks that tifffile's directory parsing reads through: small, since a slide's
#: directories and tile tables are a small part of it, scattered over the file. Blocks
#: are shared by every open of the same URL in this process (an object never changes
#: once written), so opening a slide again (each part of a job, each loader thread)
#: fetches no directory twice; at most :data:`SHARED_BLOCK_BYTES` are kept.
METADATA_BLOCK_BYTES = 16 * 1024
SHARED_BLOCK_BYTES = 64 << 20


class ByteCounter:
    """A thread-safe running total of bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0

    def add(self, count: int) -> None:
        with self._lock:
            self._total += count

    @property
    def total(self) -> int:
        with self._lock:
            return self._total


#: Bytes this process fetched from remote slides (tile ranges and directory blocks).
REMOTE_BYTES = ByteCounter()


def is_url(path: str | Path) -> bool:
    """Whether ``path`` is a URL with a scheme (``s3://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def write_slide_ref(path: Path, url: str, sha256: str | None = None) -> Path:
    """Write a slide reference naming ``url`` at ``path``; ``path``.

    ``sha256`` is the remote file's, known from its upload: provenance records it
    without reading the whole file (:func:`recorded_sha256`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"url": url, "sha256": sha256})
    # atomically: another process may be opening the same reference right now
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(SLIDEREF_MAGIC + b", " + body[1:].encode())
    os.replace(tmp, path)
    return path


def is_slide_ref(path: Path) -> bool:
    """Whether ``path`` is a slide reference (a small file starting with the magic)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_SLIDEREF_BYTES:
            return False
        with open(path, "rb") as fh:
            return fh.read(len(SLIDEREF_MAGIC)) == SLIDEREF_MAGIC
    except OSError:
        return False


def _ref(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_bytes())
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def recorded_sha256(path: Path) -> str | None:
    """The sha256 a slide reference records for its remote file; None for any other
    path (hash the file itself) or a reference that records none."""
    if not is_slide_ref(path):
        return None
    try:
        value = _ref(path).get("sha256")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def read_slide_ref(path: Path) -> str:
    """The URL a slide reference names."""
    try:
        url = _ref(path)["url"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SlideUnreadable(f"{path.name!r} is not a readable slide reference: {err}") from err
    if not isinstance(url, str) or not is_url(url):
        raise SlideUnreadable(f"{path.name!r} names no remote URL")
    return url


class RemoteFile:
    """One remote file: its size, ranged reads, and a buffered handle for parsers."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url
        self.name = posixpath.basename(url.rstrip("/")) or url
        try:
            self._fs, self._path = fsspec.core.url_to_fs(url, **(storage_options or {}))
            self.size = int(self._fs.size(self._path))
        except FileNotFoundError as err:
            raise SlideUnreadable(f"{self.name!r} is not in the store ({url})") from err
        except Exception as err:  # s3fs/botocore raise many types (auth, network)
            raise SlideUnreadable(f"cannot reach {self.name!r} ({url}): {err}") from err
        self._handle: IO[bytes] | None = None

    def read_at(self, count: int, offset: int) -> bytes:
        """``count`` bytes at ``offset`` with one ranged request (thread-safe)."""
        if count <= 0:
            return b""
        end = min(offset + count, self.size)
        data = bytes(self._fs.cat_file(self._path, start=offset, end=end)) if end > offset else b""
        REMOTE_BYTES.add(len(data))
        return data

    def open(self) -> IO[bytes]:
        """A seekable handle over cached small blocks (one per file: each caller seeks
        where it reads). Not thread-safe (one file position): for parsing directories,
        not for tiles."""
        if self._handle is None:
            self._handle = io.BufferedReader(_BlockReader(self), buffer_size=4096)
        self._handle.seek(0)
        return self._handle

    def blocks(self, first: int, last: int) -> list[bytes]:
        """Blocks ``first..last`` of the file: cached ones from the shared cache, each
        run of missing ones with one ranged read."""
        with _BLOCKS_LOCK:
            found = {i: _BLOCKS.get((self.url, i)) for i in range(first, last + 1)}
            for i, data in found.items():
                if data is not None:
                    _BLOCKS.move_to_end((self.url, i))
        missing = [i for i, data in found.items() if data is None]
        runs: list[list[int]] = []
        for i in missing:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            data = self.read_at(len(run) * METADATA_BLOCK_BYTES, run[0] * METADATA_BLOCK_BYTES)
            for k, i in enumerate(run):
                found[i] = data[k * METADATA_BLOCK_BYTES : (k + 1) * METADATA_BLOCK_BYTES]
            _keep({(self.url, i): found[i] or b"" for i in run})
        return [found[i] or b"" for i in range(first, last + 1)]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


_BLOCKS: OrderedDict[tuple[str, int], bytes] = OrderedDict()
_BLOCKS_LOCK = threading.Lock()
_blocks_bytes = 0


def _keep(blocks: dict[tuple[str, int], bytes]) -> None:
    """Add blocks to the shared cache; the least recently used go past the bound."""
    global _blocks_bytes
    with _BLOCKS_LOCK:
        for key, data in blocks.items():
            if key not in _BLOCKS:
                _BLOCKS[key] = data
                _blocks_bytes += len(data)
        while _blocks_bytes > SHARED_BLOCK_BYTES and _BLOCKS:
            _, dropped = _BLOCKS.popitem(last=False)
            _blocks_bytes -= len(dropped)


class _BlockReader(io.RawIOBase):
    """A raw, seekable reader of a :class:`RemoteFile` through its shared blocks."""

    def __init__(self, remote: RemoteFile) -> None:
        super().__init__()
        self._remote = remote
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._remote.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), max(0, self._remote.size - self._pos))
        if wanted == 0:
            return 0
        first = self._pos // METADATA_BLOCK_BYTES
        last = (self._pos + wanted - 1) // METADATA_BLOCK_BYTES
        done = 0
        for block in self._remote.blocks(first, last):
            start = (self._pos + done) % METADATA_BLOCK_BYTES
            take = min(wanted - done, len(block) - start)
            if take <= 0:
                break
            view[done : done + take] = block[start : start + take]
            done += take
        self._pos += done
        return done
