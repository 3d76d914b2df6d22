"""Multi-file slides uploaded as one archive: a DICOM WSI folder, an MRXS with its data
folder, sent as a zip or a tar (plain, gzip, bzip2 or xz).

The upload is unpacked into a fresh folder under ``<data_dir>/tmp``, member by member,
refusing what could write outside it or blow up (answered 4xx with the reason, and the
folder removed, so nothing is left on disk):

* a member with an absolute path, a drive letter, a backslash, a ``..`` part or a control
  character (zip slip), one that appears twice or collides with a folder;
* a link (symbolic or hard), a device, a FIFO, a socket, a sparse or encrypted member;
* more than :data:`MAX_MEMBERS` members, or more than ``SLIDEPIPE_MAX_UPLOAD_BYTES``
  unpacked (counted on the bytes written, not on what the headers declare);
* an archive with no slide in it (415), or with several (422).

The slide inside is then opened like any upload; accepted, the folder goes into the
store as ``slides/<slide id>/`` (a rename on a ``file://`` store, an upload of each file
on ``s3://``) and the slide's path points into it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from service.upload_errors import (
    BrokenSlide,
    DeclaresTooMuch,
    NotASlide,
    PayloadTooLarge,
    UploadRejected,
    raise_if_full,
)
from service.uploads import inspect_slide, register_slide, slide_limits, slide_row
from workers.jobs.objects import get_object_store
from workers.jobs.rows import SlideRow, new_id
from workers.jobs.settings import Settings, slide_rel_path
from workers.jobs.store import JobStore
from workers.storage.objects import Store
from wsi.errors import SlideError
from wsi.limits import SlideTooLarge
from wsi.slide_files import DICOM_SUFFIXES, SINGLE_FILE_SUFFIXES, is_dicom, resolve_slide_path

log = logging.getLogger(__name__)

MAX_MEMBERS = 10_000
MAX_DEPTH = 16
COPY_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_COMPRESSED_TAR_MAGICS = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class UnsafeArchive(UploadRejected):
    """A member that could write outside the unpack folder, or is not a plain file."""

    status_code = 422


class BrokenArchive(UploadRejected):
    status_code = 422


def archive_kind(path: Path) -> str | None:
    """``zip``, ``tar`` or None (not an archive), from the file's first bytes."""
    with path.open("rb") as fh:
        head = fh.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head.startswith(_COMPRESSED_TAR_MAGICS) or head[257:262] == b"ustar":
        return "tar"
    return None


def safe_parts(name: str, label: str) -> tuple[str, ...]:
    """The member's path as parts, or :class:`UnsafeArchive` naming it and why."""
    shown = name[:200]
    if not name or _CONTROL.search(name):
        raise UnsafeArchive(f"{label!r}: member {shown!r} has an empty name or control "
                            "characters")
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or "\\" in name:
        raise UnsafeArchive(f"{label!r}: member {shown!r} has an absolute path or a "
                            "backslash; members must be relative paths")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive(f"{label!r}: member {shown!r} climbs out of the archive with "
                            "'..' (zip slip)")
    if not parts or len(parts) > MAX_DEPTH or any(len(p.encode()) > 255 for p in parts):
        raise UnsafeArchive(f"{label!r}: member {shown!r} is nested deeper than "
                            f"{MAX_DEPTH} folders or has a part over 255 bytes")
    return parts


@dataclass
class _Unpacker:
    """Writes members under ``root``, counting members and bytes against the limits."""

    root: Path
    label: str
    max_bytes: int
    members: int = 0
    written: int = 0

    def count(self) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise PayloadTooLarge(f"{self.label!r} holds more than {MAX_MEMBERS} members; "
                                  "a slide's files are far fewer")

    def folder(self, parts: tuple[str, ...]) -> None:
        self.count()
        (self.root.joinpath(*parts)).mkdir(parents=True, exist_ok=True)

    def file(self, parts: tuple[str, ...], source: IO[bytes]) -> None:
        self.count()
        target = self.root.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link, never over an earlier member
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as err:
            raise UnsafeArchive(f"{self.label!r}: member {'/'.join(parts)!r} appears twice "
                                "or collides with a folder") from err
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(COPY_CHUNK):
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise PayloadTooLarge(
                        f"{self.label!r} unpacks to more than {self.max_bytes} bytes "
                        "(SLIDEPIPE_MAX_UPLOAD_BYTES)")
                out.write(chunk)


def _unzip(path: Path, unpacker: _Unpacker) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise PayloadTooLarge(f"{unpacker.label!r} holds {len(infos)} members, more than "
                                  f"{MAX_MEMBERS}; a slide's files are far fewer")
        for info in infos:  # every member checked before any byte is written
            parts = safe_parts(info.filename, unpacker.label)
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                kind = "a link" if stat.S_ISLNK(mode) else "a device or special file"
                raise UnsafeArchive(f"{unpacker.label!r}: member {info.filename[:200]!r} is "
                                    f"{kind}; only plain files and folders are unpacked")
            if info.flag_bits & 0x1:
                raise UnsafeArchive(f"{unpacker.label!r}: member {info.filename[:200]!r} is "
                                    "encrypted")
            del parts
        for info in infos:
            parts = safe_parts(info.filename, unpacker.label)
            if info.is_dir():
                unpacker.folder(parts)
            else:
                with zf.open(info) as source:
                    unpacker.file(parts, source)


def _untar(path: Path, unpacker: _Unpacker) -> None:
    with tarfile.open(path, mode="r:*") as tf:
        for member in tf:  # a tar has no index: each member is checked as it streams
            parts = safe_parts(member.name, unpacker.label)
            if member.isdir():
                unpacker.folder(parts)
                continue
            if not member.isreg() or member.issparse():
                kind = ("a link" if member.issym() or member.islnk() else
                        "a device or special file")
                raise UnsafeArchive(f"{unpacker.label!r}: member {member.name[:200]!r} is "
                                    f"{kind}; only plain files and folders are unpacked")
            if member.size > unpacker.max_bytes:
                raise PayloadTooLarge(
                    f"{unpacker.label!r}: member {member.name[:200]!r} declares "
                    f"{member.size} bytes, more than {unpacker.max_bytes}")
            source = tf.extractfile(member)
            if source is None:
                raise BrokenArchive(f"{unpacker.label!r}: member {member.name[:200]!r} has "
                                    "no data")
            with source:
                unpacker.file(parts, source)


def find_slide(root: Path, label: str) -> Path:
    """The slide in an unpacked archive: the one .mrxs, else the one folder of DICOM
    files, else the one slide file."""
    files = [p for p in root.rglob("*") if p.is_file()]
    mrxs = [p for p in files if p.suffix.lower() == ".mrxs"]
    dicom_dirs = sorted({p.parent for p in files
                         if p.suffix.lower() in DICOM_SUFFIXES or is_dicom(p)})
    singles = [p for p in files if p.suffix.lower() in SINGLE_FILE_SUFFIXES]
    for found in (mrxs, dicom_dirs, singles):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(root)) for p in found[:5])
            raise UploadRejected(f"{label!r} holds {len(found)} slides ({names}); upload "
                                 "one slide per archive", 422)
    raise NotASlide(
        f"{label!r} holds no slide: expected the DICOM files (.dcm) of one slide, an .mrxs "
        "file with its data folder, or one slide file")


@contextmanager
def _staging(settings: Settings) -> Iterator[Path]:
    """A fresh folder under the temp dir, removed unless the caller moved it away."""
    root = settings.tmp_dir / f"unpack-{uuid.uuid4().hex}"
    root.mkdir(parents=True)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _unpack(path: Path, kind: str, unpacker: _Unpacker) -> None:
    label = unpacker.label
    try:
        (_unzip if kind == "zip" else _untar)(path, unpacker)
    except UploadRejected:
        raise
    except OSError as err:  # a full disk is the server's (507); anything else the archive's
        raise_if_full(err, f"unpacking {label!r}")
        raise BrokenArchive(f"{label!r} is a damaged {kind} archive: "
                            f"{type(err).__name__}: {err}") from err
    except Exception as err:  # zipfile, tarfile and the codecs raise many types on garbage
        raise BrokenArchive(f"{label!r} is a damaged or unsupported {kind} archive: "
                            f"{type(err).__name__}: {err}") from err


def store_if_archive(temp_path: Path, sha256: str, size: int, label: str, owner: str,
                     settings: Settings, store: JobStore) -> tuple[SlideRow, bool] | None:
    """Unpack, check and store an uploaded archive's slide; None when the upload is no
    archive (the caller handles single-file slides)."""
    kind = archive_kind(temp_path)
    if kind is None:
        return None
    with _staging(settings) as root:
        unpacker = _Unpacker(root=root / "slide", label=label,
                             max_bytes=settings.max_upload_bytes)
        unpacker.root.mkdir()
        _unpack(temp_path, kind, unpacker)
        found = find_slide(unpacker.root, label)
        try:
            info = inspect_slide(resolve_slide_path(found), b"", slide_limits(settings))
        except SlideTooLarge as err:
            raise DeclaresTooMuch(f"{label!r}: {err}") from err
        except SlideError as err:
            raise BrokenSlide(f"{label!r} holds {found.name!r}, which is not a readable "
                              f"slide: {err}") from err
        slide_id = new_id()
        folder_key = slide_rel_path(slide_id, "")
        inner = found.relative_to(unpacker.root).as_posix()
        rel_path = folder_key + ("" if inner == "." else "/" + inner)
        objects = get_object_store(settings)
        if objects.is_local:
            os.replace(unpacker.root, objects.local_path(folder_key))
        else:
            publish_folder(objects, unpacker.root, folder_key)
    row = slide_row(slide_id, owner, sha256, label, size, rel_path, info)
    stored, created = register_slide(store, objects, row, key=folder_key)
    log.info("slide %s stored for %s from %s archive %s (%d members, %d bytes unpacked)",
             stored.id, owner, kind, label, unpacker.members, unpacker.written)
    return stored, created


def publish_folder(objects: Store, folder: Path, key: str) -> None:
    """Upload an unpacked slide folder, file by file, under ``key``."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            objects.put_file(path, f"{key}/{path.relative_to(folder).as_posix()}")
