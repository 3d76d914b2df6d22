"""Slide uploads: stream to a temp file while hashing, validate, move into place atomically.

The body (raw, or the first file part of a multipart form, parsed as it streams) is
written in chunks to ``<data_dir>/tmp``; it is never held whole in memory. The file is
then opened with the slide reader (and, for TIFF-based files, its tile data checked to
lie inside the file, which catches truncation), deduplicated by sha256 per owner and
put into the store as ``slides/<slide id><ext>``: renamed into the data dir on a
``file://`` store, streamed up chunk by chunk (a multipart upload) on ``s3://``. The
client's filename is kept only as a label: the name in the store is the server's. Any
rejection removes the temp file.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from service.upload_errors import (
    BrokenSlide,
    DeclaresTooMuch,
    NotASlide,
    PayloadTooLarge,
    UploadRejected,
)
from service.upload_stream import TempUpload, clean_filename, receive_multipart, receive_raw
from workers.jobs.objects import get_object_store
from workers.jobs.rows import SlideRow, new_id
from workers.jobs.settings import Settings, slide_rel_path
from workers.jobs.store import JobStore
from workers.storage.objects import Store
from wsi.errors import SlideError
from wsi.limits import (
    SlideLimits,
    SlideTooLarge,
    check_declared,
    check_decodes,
    check_tiff_header,
)
from wsi.reader import Slide

log = logging.getLogger(__name__)

#: Single-file slide formats whose suffix is kept on disk (readers sniff content anyway).
KNOWN_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".qptiff", ".btf"}
)
#: Leading bytes of formats a slide reader could open: a file starting otherwise is 415.
SLIDE_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\x89HDF", b"DICM")
MULTIPART_OVERHEAD_BYTES = 1 << 20
def disk_suffix(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    return suffix if suffix in KNOWN_SUFFIXES else ""


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


def slide_limits(settings: Settings) -> SlideLimits:
    return SlideLimits(
        max_pixels=settings.max_slide_pixels,
        max_levels=settings.max_slide_levels,
        max_pixels_per_byte=settings.max_pixels_per_byte,
        check_s=settings.upload_check_s,
    )


def inspect_slide(path: Path, head: bytes, limits: SlideLimits | None = None) -> SlideInfo:
    """Open the file as a slide and decode real pixels, at a cost bounded by the file.

    Declared sizes are checked from the TIFF directories before a reader opens it, and
    from the reader after; then a bounded number of tiles is decoded within a time
    budget (:mod:`wsi.limits`). Raises SlideError (SlideTooLarge for a bomb).
    """
    limits = limits or SlideLimits()
    check_tiff_header(path, limits)
    with Slide(path) as slide:
        check_declared(slide, limits)
        check_decodes(slide, limits)  # decodes real pixels, not just the header
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
    temp = TempUpload(path=settings.tmp_dir / f"upload-{uuid.uuid4().hex}.part", limit=limit)
    temp.open()
    try:
        if multipart:
            boundary = options.get(b"boundary")
            if not boundary:
                raise UploadRejected("multipart/form-data without a boundary")
            part_name = await receive_multipart(request, temp, boundary, limit + slack)
            filename = filename or part_name
        else:
            await receive_raw(request, temp)
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
    temp: TempUpload, label: str, owner: str, settings: Settings, store: JobStore
) -> tuple[SlideRow, bool]:
    sha256 = temp.sha.hexdigest()
    existing = store.find_slide_by_sha(owner, sha256)
    if existing is not None:
        return existing, False
    from service.archives import store_if_archive  # a multi-file slide as zip or tar

    unpacked = store_if_archive(temp.path, sha256, temp.size, label, owner, settings, store)
    if unpacked is not None:
        return unpacked
    suffix = disk_suffix(label)
    # readers sniff content, but a known suffix helps format detection
    probe = temp.path.with_name(temp.path.stem + suffix) if suffix else temp.path
    if probe != temp.path:
        os.replace(temp.path, probe)
        temp.path = probe
    try:
        info = inspect_slide(temp.path, temp.head, slide_limits(settings))
    except SlideTooLarge as err:
        raise DeclaresTooMuch(str(err).replace(temp.path.name, label)) from err
    except SlideError as err:
        reason = str(err).replace(temp.path.name, label)
        if temp.head[:4] not in SLIDE_MAGICS:
            raise NotASlide(f"{label!r} is not a slide format any reader opens ({reason})") from err
        raise BrokenSlide(f"{label!r} is not a readable slide: {reason}") from err
    slide_id = new_id()
    rel_path = slide_rel_path(slide_id, suffix)
    objects = get_object_store(settings)
    objects.put_file(temp.path, rel_path, move=True)
    stored, created = register_slide(
        store, objects, slide_row(slide_id, owner, sha256, label, temp.size, rel_path, info),
        key=rel_path,
    )
    log.info("slide %s stored for %s (%s, %d bytes)", stored.id, owner, label, temp.size)
    return stored, created


def slide_row(slide_id: str, owner: str, sha256: str, label: str, size_bytes: int,
              rel_path: str, info: SlideInfo) -> SlideRow:
    """The database row of a slide now in the store, from what its reader said."""
    return SlideRow(
        id=slide_id, owner=owner, sha256=sha256, filename=label, size_bytes=size_bytes,
        rel_path=rel_path, width=info.width, height=info.height,
        level_count=info.level_count, level_dimensions=info.level_dimensions,
        level_downsamples=info.level_downsamples, mpp=info.mpp, vendor=info.vendor,
        backend=info.backend,
    )


def register_slide(store: JobStore, objects: Store, row: SlideRow, *,
                   key: str) -> tuple[SlideRow, bool]:
    """Add ``row``; its objects under ``key`` are deleted when that fails or when the
    same content of the same owner was already there (a race we lost): nothing is
    left in the store that no row names."""
    try:
        stored, created = store.add_slide(row)
    except BaseException:
        objects.delete(key)
        raise
    if not created:
        objects.delete(key)
    return stored, created
