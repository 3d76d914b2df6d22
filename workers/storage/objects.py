"""``Store``: where slides and results live, behind one URL (``SLIDEPIPE_STORAGE_URL``).

Keys are the data dir's relative paths (``slides/<id>.svs``, ``results/...``), so a
``file://`` store is the data dir itself: :meth:`Store.local_path` gives the very path
everything used before, and moving a finished file into place is one rename (no copy,
no extra byte). An ``s3://bucket/prefix`` store goes through fsspec/s3fs with the
standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for S3-compatible servers); files are streamed up and down in
chunks (s3fs writes multipart uploads block by block), never held whole in memory.

Bytes moved are counted per process (:attr:`Store.bytes_read`, :attr:`Store.bytes_written`;
range reads of remote slides, made inside the slide reader, are included in
``bytes_read``) for the metrics endpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast
from urllib.parse import urlparse

from workers.storage.errors import StorageError
from wsi.remote import REMOTE_BYTES, ByteCounter

log = logging.getLogger(__name__)

#: Bytes per read or write call when streaming a file (s3fs uploads 5 MiB+ parts).
CHUNK_BYTES = 8 << 20


def check_key(key: str) -> str:
    """A key is a relative POSIX path without empty, ``.`` or ``..`` parts."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key[:200]!r}")
    return key


class Store:
    """One storage root: a local folder (``file://``) or an S3 prefix (``s3://``)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        parsed = urlparse(url)
        self.url = url.rstrip("/")
        self.scheme = parsed.scheme or "file"
        self._written = ByteCounter()
        self._read = ByteCounter()
        self.local_root: Path | None = None
        self.storage_options: dict[str, Any] = {}
        if self.scheme == "file":
            self.local_root = Path(parsed.path if parsed.scheme else url).resolve()
            self._fs: Any = None
            self._root = str(self.local_root)
            return
        if self.scheme != "s3":
            raise StorageError(
                f"SLIDEPIPE_STORAGE_URL must be file:///... or s3://bucket/prefix, got {url!r}"
            )
        if not parsed.netloc:
            raise StorageError(f"SLIDEPIPE_STORAGE_URL {url!r} names no bucket")
        import fsspec

        options: dict[str, Any] = {"use_listings_cache": False}  # other hosts write too
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        options.update(storage_options or {})
        self.storage_options = options
        self._fs = fsspec.filesystem("s3", **options)
        self._root = f"{parsed.netloc}{parsed.path}".rstrip("/")

    # -- where a key is ---------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.local_root is not None

    def local_path(self, key: str) -> Path:
        """The file of ``key`` in a ``file://`` store (the data dir's path, as before)."""
        if self.local_root is None:
            raise StorageError(f"{self.url} is not a local store: {key!r} has no local path")
        return self.local_root / check_key(key)

    def url_of(self, key: str) -> str:
        """An fsspec URL of ``key`` (what a remote reader opens)."""
        if self.local_root is not None:
            return self.local_path(key).as_uri()
        return f"s3://{self._root}/{check_key(key)}"

    def _full(self, key: str) -> str:
        return f"{self._root}/{check_key(key)}"

    # -- counters -------------------------------------------------------------------------
    @property
    def bytes_read(self) -> int:
        """Bytes this process read from the store (downloads plus slide range reads)."""
        return self._read.total + (REMOTE_BYTES.total if self._fs is not None else 0)

    @property
    def bytes_written(self) -> int:
        return self._written.total

    # -- objects ----------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        if self.local_root is not None:
            return self.local_path(key).exists()
        return bool(self._fs.exists(self._full(key)))

    def put_file(self, source: Path, key: str, *, move: bool = False) -> int:
        """Copy (or with ``move``, rename on a local store) ``source`` to ``key``; its size.

        On S3 the file is streamed up in chunks (a multipart upload for big files).
        """
        size = source.stat().st_size
        if self.local_root is not None:
            target = self.local_path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            if move:
                os.replace(source, target)
            else:
                shutil.copyfile(source, target)
            self._written.add(size)
            return size
        try:
            with open(source, "rb") as src, self._fs.open(
                self._full(key), "wb", block_size=max(CHUNK_BYTES, 5 << 20)
            ) as dst:
                while chunk := src.read(CHUNK_BYTES):
                    dst.write(chunk)
                    self._written.add(len(chunk))
        except Exception as err:  # botocore/aiohttp raise many types (auth, network)
            raise StorageError(f"uploading {key!r} to {self.url} failed: {err}") from err
        if move:
            source.unlink(missing_ok=True)
        return size

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.local_root is not None:
            target = self.local_path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        else:
            try:
                self._fs.pipe_file(self._full(key), data)
            except Exception as err:
                raise StorageError(f"writing {key!r} to {self.url} failed: {err}") from err
        self._written.add(len(data))

    def get_bytes(self, key: str) -> bytes:
        if self.local_root is not None:
            data = self.local_path(key).read_bytes()
        else:
            data = bytes(self._fs.cat_file(self._full(key)))
        self._read.add(len(data))
        return data

    def get_file(self, key: str, target: Path) -> int:
        """Stream ``key`` down into ``target`` (chunk by chunk); its size."""
        target.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with self.open_read(key) as src, open(target, "wb") as dst:
            while chunk := src.read(CHUNK_BYTES):
                dst.write(chunk)
                size += len(chunk)
        return size

    def open_read(self, key: str) -> IO[bytes]:
        """A readable handle of ``key``, whose bytes are counted as they are read."""
        if self.local_root is not None:
            return open(self.local_path(key), "rb")  # noqa: SIM115 - the caller closes it
        try:
            handle = self._fs.open(self._full(key), "rb", block_size=CHUNK_BYTES)
        except FileNotFoundError as err:
            raise StorageError(f"{key!r} is not in {self.url}") from err
        return cast(IO[bytes], _Counted(handle, self._read))

    def list_files(self, prefix: str) -> list[str]:
        """Every file key under the folder ``prefix`` (recursive, sorted)."""
        prefix = check_key(prefix)
        if self.local_root is not None:
            root = self.local_path(prefix)
            if not root.is_dir():
                return []
            return sorted(f"{prefix}/{p.relative_to(root).as_posix()}"
                          for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        base = self._full(prefix)
        try:
            found = self._fs.find(base)
        except FileNotFoundError:
            return []
        return sorted(f"{prefix}/{str(f)[len(base) + 1:]}" for f in found
                      if str(f).startswith(base + "/"))

    def list_dir(self, prefix: str) -> list[str]:
        """The names directly under the folder ``prefix`` (files and folders)."""
        if self.local_root is not None:
            root = self.local_path(prefix)
            return sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        try:
            found = self._fs.ls(self._full(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(str(f)).name for f in found)

    def delete(self, key: str) -> None:
        """Remove a file or a whole folder (prefix); missing is fine."""
        if self.local_root is not None:
            path = self.local_path(key)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        full = self._full(key)
        try:
            keys = [f for f in self._fs.find(full) if str(f).startswith(full + "/")]
            if self._fs.isfile(full):
                keys.append(full)
            if keys:
                self._fs.rm(keys)
        except FileNotFoundError:
            pass

    def iter_tree(self, prefix: str) -> Iterator[tuple[str, int]]:
        """``(relative name, size)`` of every file under ``prefix``."""
        for key in self.list_files(prefix):
            rel = key[len(prefix) + 1:]
            if self.local_root is not None:
                size = self.local_path(key).stat().st_size
            else:
                size = int(self._fs.size(self._full(key)))
            yield rel, size

    def __repr__(self) -> str:
        return f"Store({self.url!r})"


class _Counted:
    """A read handle that adds what is read to a counter."""

    def __init__(self, handle: Any, counter: ByteCounter) -> None:
        self._handle, self._counter = handle, counter

    def read(self, size: int = -1) -> bytes:
        data = bytes(self._handle.read(size))
        self._counter.add(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._handle.seek(offset, whence))

    def tell(self) -> int:
        return int(self._handle.tell())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
