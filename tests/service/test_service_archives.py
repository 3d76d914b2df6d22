"""Every slide a lab sends, over REST: a DICOM WSI folder as one zip or tar archive; bad
archives answered 4xx with the reason and nothing left on disk; the tissue picture of an
uploaded slide; a slide without tissue says so in the job's JSON.

Real parts only: the session's uvicorn and Celery worker (``conftest.Stack``), openslide's
own DICOM fixture, archives written with ``zipfile``/``tarfile``.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import Stack

from tests.data import BuiltSlide
from tests.service.conftest import MAX_UPLOAD_BYTES


def zip_of(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def tar_of(members: dict[str, bytes], mode: str = "w:gz",
           specials: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in specials or []:
            tf.addfile(info)
    return buf.getvalue()


def dicom_members(dicom_dir: Path, folder: str = "CMU-1/") -> dict[str, bytes]:
    return {folder + p.name: p.read_bytes() for p in sorted(dicom_dir.glob("*.dcm"))}


def post(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/v1/slides", files={"file": (name, data, "application/octet-stream")})


@pytest.fixture
def clean(stack: Stack, alice: httpx.Client) -> Iterator[None]:
    """The test leaves no temp upload or unpack folder, and no new slide file."""
    slides_before = stack.slide_files()
    yield
    assert stack.leftovers() == []
    assert stack.slide_files() == slides_before


def test_dicom_folder_as_zip_and_tar(stack: Stack, alice: httpx.Client,
                                     dicom_dir: Path) -> None:
    r = post(alice, "CMU-1.zip", zip_of(dicom_members(dicom_dir)))
    assert r.status_code == 201, r.text
    slide = r.json()
    assert (slide["vendor"], slide["width"], slide["height"]) == ("dicom", 16, 16)
    assert slide["mpp"] == pytest.approx(0.499) and slide["filename"] == "CMU-1.zip"
    assert (stack.data_dir / "slides" / slide["id"] / "CMU-1" / "boxes_0.dcm").is_file()
    thumb = alice.get(f"/v1/slides/{slide['id']}/thumbnail.png", params={"max_size": 16})
    assert thumb.status_code == 200 and thumb.content[:4] == b"\x89PNG"
    # the same slide as a .tar.gz with the files at the top: another archive, another slide
    r = post(alice, "CMU-1.tar.gz", tar_of(dicom_members(dicom_dir, "")))
    assert r.status_code == 201, r.text
    assert r.json()["vendor"] == "dicom" and r.json()["id"] != slide["id"]
    # deleting removes the whole folder
    assert alice.delete(f"/v1/slides/{slide['id']}").status_code == 204
    assert not (stack.data_dir / "slides" / slide["id"]).exists()
    assert stack.leftovers() == []


def test_dicom_zip_runs_and_says_it_found_no_tissue(stack: Stack, alice: httpx.Client,
                                                    dicom_dir: Path) -> None:
    """The 16 x 16 px DICOM (8 µm across) holds no 200 µm² of tissue: the job succeeds,
    analyses nothing, and its JSON says so."""
    slide = post(alice, "dicom-run.zip", zip_of(dicom_members(dicom_dir, "run/"))).json()
    job = alice.post("/v1/jobs", json={"slide_id": slide["id"], "model": "identity"}).json()
    done = stack.wait_job(alice, job["job_id"])
    assert done["status"] == "succeeded", done
    assert done["result_info"]["tiles_total"] == 0
    (warning,) = done["warnings"]
    assert warning == done["result_info"]["warnings"][0]
    assert "no tissue on 'boxes_0.dcm'" in warning and "'stain'" in warning


def test_blank_slide_job_warns(stack: Stack, alice: httpx.Client, blank_svs: BuiltSlide
                              ) -> None:
    """A pen-free, tissue-free slide: the job's JSON carries the warning naming the slide,
    the method and what it found."""
    slide = stack.upload(alice, blank_svs.path, "blank.svs")
    job = alice.post("/v1/jobs", json={"slide_id": slide["id"], "model": "identity",
                                       "parameters": {"target_mpp": 4.0}}).json()
    done = stack.wait_job(alice, job["job_id"])
    assert done["status"] == "succeeded", done
    assert done["result_info"]["tiles_total"] == 0
    (warning,) = done["warnings"]
    assert "no tissue on" in warning and "tissue method 'stain'" in warning
    assert "0 mm² of tissue in 0 fragments" in warning


@pytest.mark.parametrize(
    ("name", "make", "status", "reason"),
    [
        ("slip.zip", lambda d: zip_of({"../evil.dcm": d}), 422, "zip slip"),
        ("abs.zip", lambda d: zip_of({"/etc/evil.dcm": d}), 422, "absolute path"),
        ("back.zip", lambda d: zip_of({"a\\..\\evil.dcm": d}), 422, "backslash"),
        ("link.zip", lambda d: zip_of({"CMU-1/boxes_0.dcm": d},
                                      links={"CMU-1/x.dcm": "/etc/passwd"}), 422, "a link"),
        ("slip.tar.gz", lambda d: tar_of({"ok/../../evil.dcm": d}), 422, "zip slip"),
        ("link.tar", lambda d: tar_of({"boxes_0.dcm": d}, "w", [_tar_link()]), 422, "a link"),
        ("dev.tar", lambda d: tar_of({"boxes_0.dcm": d}, "w", [_tar_device()]), 422,
         "a device"),
        ("twice.tar", lambda d: tar_of({"a.dcm": d, "./a.dcm": d}, "w"), 422, "appears twice"),
        ("bomb.zip", lambda d: zip_of({"a.dcm": d, "zeros.bin": bytes(MAX_UPLOAD_BYTES + 1)}),
         413, "unpacks to more than"),
        ("bomb.tar.gz", lambda d: tar_of({"zeros.bin": bytes(MAX_UPLOAD_BYTES + 1)}), 413,
         "more than"),
        ("many.zip", lambda d: zip_of({f"f{i}": b"" for i in range(10_001)}), 413,
         "more than 10000"),
        ("notes.zip", lambda d: zip_of({"notes/readme.txt": b"no slide here"}), 415,
         "holds no slide"),
        ("cut.zip", lambda d: zip_of({"CMU-1/boxes_0.dcm": d})[:-30], 422, "damaged"),
    ],
)
def test_bad_archives_are_refused_with_the_reason(
    alice: httpx.Client, dicom_dir: Path, clean: None, name: str, make, status: int,
    reason: str,
) -> None:
    r = post(alice, name, make((dicom_dir / "boxes_0.dcm").read_bytes()))
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert reason in detail and name in detail, detail
    assert "unpack-" not in detail and "/tmp" not in detail  # no server paths


def _tar_link() -> tarfile.TarInfo:
    info = tarfile.TarInfo("CMU-1/passwd.dcm")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


def _tar_device() -> tarfile.TarInfo:
    info = tarfile.TarInfo("CMU-1/null")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


def test_tissue_picture_of_an_uploaded_slide(stack: Stack, alice: httpx.Client,
                                             bob: httpx.Client, anonymous: httpx.Client,
                                             svc_slides: dict) -> None:
    slide = stack.upload(alice, svc_slides["cmu"])
    url = f"/v1/slides/{slide['id']}/tissue.png"
    r = alice.get(url, params={"max_size": 512})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:4] == b"\x89PNG"
    assert int(r.headers["x-tissue-fragments"]) >= 3  # the main piece and two fragments
    assert 0.6e6 < float(r.headers["x-tissue-area-um2"]) < 0.7e6
    old = alice.get(url, params={"tissue_method": "hsv-otsu", "tissue_working_mpp": 8,
                                 "min_fragment_um2": 20000})
    assert old.status_code == 200 and old.headers["x-tissue-fragments"] == "1"
    assert alice.get(url, params={"tissue_method": "magic"}).status_code == 422
    assert alice.get(url, params={"min_fragment_um2": -1}).status_code == 422
    assert bob.get(url).status_code == 404  # another owner's slide does not exist for bob
    assert anonymous.get(url).status_code == 401
