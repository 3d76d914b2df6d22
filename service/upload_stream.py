"""Receiving an upload's body: streamed to a temp file in chunks, hashed and size-checked
on the way, never held whole in memory; a multipart body is parsed as it streams and only
its first file part is kept.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from python_multipart.multipart import MultipartParser
from starlette.requests import Request

from service.filenames import part_filename
from service.upload_errors import BadFilename, PayloadTooLarge, UploadRejected, raise_if_full

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean_filename(name: str | None) -> str:
    """The client's filename as a label; anything path-like is refused, not rewritten."""
    if name is None or not name.strip():
        return "upload"
    if (
        "/" in name
        or "\\" in name
        or name in (".", "..")
        or name.startswith("..")
        or _CONTROL.search(name)
        or len(name) > 255
    ):
        raise BadFilename(
            f"filename must be a plain file name (no directories, no '..', no control "
            f"characters, at most 255 characters), got {name[:100]!r}"
        )
    return name



@dataclass
class TempUpload:
    """A temp file that is hashed and size-checked as it is written."""

    path: Path
    limit: int
    size: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    fh: BinaryIO | None = None
    head: bytes = b""

    def open(self) -> None:
        try:
            self.fh = open(self.path, "xb")  # noqa: SIM115 - closed in close()
        except OSError as err:
            raise_if_full(err, "starting the upload")
            raise

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            raise PayloadTooLarge(
                f"upload exceeds the limit of {self.limit} bytes (SLIDEPIPE_MAX_UPLOAD_BYTES)"
            )
        if len(self.head) < 16:
            self.head += chunk[: 16 - len(self.head)]
        self.sha.update(chunk)
        assert self.fh is not None
        try:
            self.fh.write(chunk)
        except OSError as err:
            raise_if_full(err, f"receiving the upload ({self.size} bytes)")
            raise

    def close(self) -> None:
        if self.fh is not None and not self.fh.closed:
            try:
                self.fh.flush()
                os.fsync(self.fh.fileno())
            except OSError as err:
                raise_if_full(err, f"storing the upload ({self.size} bytes)")
                raise
            finally:
                self.fh.close()

    def discard(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.close()
        self.path.unlink(missing_ok=True)


async def _write(temp: TempUpload, chunk: bytes) -> None:
    await anyio.to_thread.run_sync(temp.write, chunk)


async def receive_raw(request: Request, temp: TempUpload) -> None:
    async for chunk in request.stream():
        await _write(temp, chunk)


class _MultipartSink:
    """Collects parser events; only the first part that carries a filename is kept."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes | dict[str, str] | None]] = []
        self._field = b""
        self._value = b""
        self._headers: dict[str, str] = {}

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        # latin-1 keeps every byte as one character: the value is decoded once, later,
        # by _part_filename (browsers send UTF-8 filenames raw inside quotes)
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        self.events.append(("headers", dict(self._headers)))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.events.append(("data", bytes(data[start:end])))

    def _part_end(self) -> None:
        self.events.append(("end", None))


async def receive_multipart(
    request: Request, temp: TempUpload, boundary: bytes, limit: int
) -> str | None:
    """Stream the first file part into ``temp``; returns the part's filename."""
    sink = _MultipartSink()
    parser = MultipartParser(boundary, sink.callbacks(), max_size=limit)  # type: ignore[arg-type]
    state = "seeking"  # seeking -> writing -> done
    filename: str | None = None
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(
                f"upload exceeds the limit of {temp.limit} bytes (SLIDEPIPE_MAX_UPLOAD_BYTES)"
            )
        try:
            parser.write(chunk)
        except Exception as err:  # python-multipart raises its own parse errors
            raise UploadRejected(f"malformed multipart body: {err}") from err
        events, sink.events = sink.events, []
        for kind, payload in events:
            if kind == "headers" and state == "seeking":
                assert isinstance(payload, dict)
                name = part_filename(payload)
                if name is not None:
                    filename = clean_filename(name) if name else "upload"
                    state = "writing"
            elif kind == "data" and state == "writing":
                assert isinstance(payload, bytes)
                await _write(temp, payload)
            elif kind == "end" and state == "writing":
                state = "done"
    if state == "seeking":
        raise UploadRejected(
            "the multipart body has no file part: send the slide as a form field with a "
            "filename (e.g. curl -F file=@slide.svs)"
        )
    if state == "writing":
        raise UploadRejected("the multipart body ended inside the file part (truncated upload)")
    return filename
