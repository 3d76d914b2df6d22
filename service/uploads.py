"""Slide uploads: stream to a temp file while hashing, validate, move into place atomically.

The body (raw, or the first file part of a multipart form, parsed as it streams) is
written in chunks to ``<data_dir>/tmp``; it is never held whole in memory. The file is
then opened with the slide reader (and, for TIFF-based files, its tile data checked to
lie inside the file, which catches truncation), deduplicated by sha256 per owner and
renamed to ``<data_dir>/slides/<slide id><ext>``. The client's filename is kept only as a
label: the name on disk is the server's. Any rejection removes the temp file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from workers.jobs.rows import SlideRow, new_id
from workers.jobs.settings import Settings, slide_rel_path
from workers.jobs.store import JobStore
from wsi.errors import SlideError
from wsi.reader import Slide

log = logging.getLogger(__name__)

#: Single-file slide formats whose suffix is kept on disk (readers sniff content anyway).
KNOWN_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".qptiff", ".btf"}
)
#: Leading bytes of formats a slide reader could open: a file starting otherwise is 415.
SLIDE_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\x89HDF", b"DICM")
MULTIPART_OVERHEAD_BYTES = 1 << 20
THUMBNAIL_CHECK_PX = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UploadRejected(Exception):
    """An upload refused with an HTTP status (the error handler uses ``status_code``)."""

    status_code = 400

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


class PayloadTooLarge(UploadRejected):
    status_code = 413


class NotASlide(UploadRejected):
    status_code = 415


class BrokenSlide(UploadRejected):
    status_code = 422


class BadFilename(UploadRejected):
    status_code = 422


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


def disk_suffix(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    return suffix if suffix in KNOWN_SUFFIXES else ""


@dataclass
class _TempUpload:
    """A temp file that is hashed and size-checked as it is written."""

    path: Path
    limit: int
    size: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    fh: BinaryIO | None = None
    head: bytes = b""

    def open(self) -> None:
        self.fh = open(self.path, "xb")  # noqa: SIM115 - closed in close()

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
        self.fh.write(chunk)

    def close(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()

    def discard(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.close()
        self.path.unlink(missing_ok=True)


async def _write(temp: _TempUpload, chunk: bytes) -> None:
    await anyio.to_thread.run_sync(temp.write, chunk)


async def _receive_raw(request: Request, temp: _TempUpload) -> None:
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
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode(
            "utf-8", "replace"
        )
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        self.events.append(("headers", dict(self._headers)))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.events.append(("data", bytes(data[start:end])))

    def _part_end(self) -> None:
        self.events.append(("end", None))


def _part_filename(headers: dict[str, str]) -> str | None:
    _, options = parse_options_header(headers.get("content-disposition", ""))
    raw = options.get(b"filename")
    return None if raw is None else raw.decode("utf-8", "replace")


async def _receive_multipart(
    request: Request, temp: _TempUpload, boundary: bytes, limit: int
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
                name = _part_filename(payload)
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


@dataclass(frozen=True)
class SlideInfo:
    width: int
    height: int
    level_count: int
    level_dimensions: list[list[int]]
    level_downsamples: list[float]
    mpp: float | None
    vendor: str
    backend: str


def inspect_slide(path: Path, head: bytes) -> SlideInfo:
    """Open the file as a slide and decode a thumbnail; raise SlideError when it fails."""
    with Slide(path) as slide:
        slide.thumbnail(THUMBNAIL_CHECK_PX)  # decodes real pixels, not just the header
        return SlideInfo(
            width=slide.dimensions[0],
            height=slide.dimensions[1],
            level_count=slide.level_count,
            level_dimensions=[list(d) for d in slide.level_dimensions],
            level_downsamples=[float(d) for d in slide.level_downsamples],
            mpp=slide.mpp if slide.has_mpp else None,
            vendor=slide.vendor,
            backend=slide.backend,
        )


async def receive_slide(
    request: Request,
    *,
    owner: str,
    settings: Settings,
    store: JobStore,
    filename: str | None,
) -> tuple[SlideRow, bool]:
    """Stream, validate and store one uploaded slide; returns ``(slide, created)``."""
    limit = settings.max_upload_bytes
    content_type = request.headers.get("content-type", "")
    media, options = parse_options_header(content_type)
    multipart = media == b"multipart/form-data"
    declared = request.headers.get("content-length")
    slack = MULTIPART_OVERHEAD_BYTES if multipart else 0
    if declared is not None and declared.isdigit() and int(declared) > limit + slack:
        raise PayloadTooLarge(
            f"upload of {declared} bytes exceeds the limit of {limit} bytes "
            "(SLIDEPIPE_MAX_UPLOAD_BYTES)"
        )
    if filename is not None:
        filename = clean_filename(filename)
    settings.ensure_dirs()
    temp = _TempUpload(path=settings.tmp_dir / f"upload-{uuid.uuid4().hex}.part", limit=limit)
    temp.open()
    try:
        if multipart:
            boundary = options.get(b"boundary")
            if not boundary:
                raise UploadRejected("multipart/form-data without a boundary")
            part_name = await _receive_multipart(request, temp, boundary, limit + slack)
            filename = filename or part_name
        else:
            await _receive_raw(request, temp)
        await anyio.to_thread.run_sync(temp.close)
        if temp.size == 0:
            raise UploadRejected("the upload is empty (0 bytes): send the slide file as the body")
        label = clean_filename(filename)
        return await anyio.to_thread.run_sync(
            _validate_and_store, temp, label, owner, settings, store
        )
    finally:
        temp.discard()  # a no-op once the file was moved into place


def _validate_and_store(
    temp: _TempUpload, label: str, owner: str, settings: Settings, store: JobStore
) -> tuple[SlideRow, bool]:
    sha256 = temp.sha.hexdigest()
    existing = store.find_slide_by_sha(owner, sha256)
    if existing is not None:
        return existing, False
    suffix = disk_suffix(label)
    # readers sniff content, but a known suffix helps format detection
    probe = temp.path.with_name(temp.path.stem + suffix) if suffix else temp.path
    if probe != temp.path:
        os.replace(temp.path, probe)
        temp.path = probe
    try:
        info = inspect_slide(temp.path, temp.head)
    except SlideError as err:
        reason = str(err).replace(temp.path.name, label)
        if temp.head[:4] not in SLIDE_MAGICS:
            raise NotASlide(f"{label!r} is not a slide format any reader opens ({reason})") from err
        raise BrokenSlide(f"{label!r} is not a readable slide: {reason}") from err
    slide_id = new_id()
    rel_path = slide_rel_path(slide_id, suffix)
    final = settings.data_dir / rel_path
    os.replace(temp.path, final)
    row = SlideRow(
        id=slide_id,
        owner=owner,
        sha256=sha256,
        filename=label,
        size_bytes=temp.size,
        rel_path=rel_path,
        width=info.width,
        height=info.height,
        level_count=info.level_count,
        level_dimensions=info.level_dimensions,
        level_downsamples=info.level_downsamples,
        mpp=info.mpp,
        vendor=info.vendor,
        backend=info.backend,
    )
    try:
        stored, created = store.add_slide(row)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    if not created:  # the same content won a race with us
        final.unlink(missing_ok=True)
    log.info("slide %s stored for %s (%s, %d bytes)", stored.id, owner, label, temp.size)
    return stored, created
