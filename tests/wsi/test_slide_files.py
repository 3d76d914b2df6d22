"""Slides given as a folder: a DICOM WSI by its folder or any of its files; MRXS beside
its data folder; a folder that holds no slide says what it expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wsi.errors import SlideUnreadable
from wsi.reader import Slide
from wsi.slide_files import is_dicom, resolve_slide_path, slide_in_folder
from wsi.tissue import tissue_mask


@pytest.mark.parametrize("given", ["folder", "boxes_0.dcm", "boxes_1.dcm"])
def test_dicom_opens_by_folder_or_any_file(dicom_dir: Path, given: str) -> None:
    path = dicom_dir if given == "folder" else dicom_dir / given
    with Slide(path) as slide:
        assert slide.vendor == "dicom" and slide.backend == "openslide"
        assert slide.dimensions == (16, 16) and slide.mpp == pytest.approx(0.499)
        pixels = slide.read_level(0, 0, 0, 16, 16)
        assert pixels.shape == (16, 16, 3) and pixels.std() > 5  # real H&E, not blank
        assert tissue_mask(slide).mask.shape == (2, 2)


def test_folder_picks_the_largest_dicom_file(dicom_dir: Path) -> None:
    assert slide_in_folder(dicom_dir).name == "boxes_0.dcm"
    assert is_dicom(dicom_dir / "boxes_1.dcm") and not is_dicom(dicom_dir.parent)


def test_dicom_without_suffix_is_found_by_its_magic(dicom_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copyfile(dicom_dir / "boxes_0.dcm", folder / "IM000001")
    (folder / "README.txt").write_text("scanner export")
    assert resolve_slide_path(folder) == folder / "IM000001"
    with Slide(folder) as slide:
        assert slide.dimensions == (16, 16)


def test_mrxs_folder_and_ambiguous_folders(tmp_path: Path, small_svs: Path) -> None:
    """Resolution only (an MRXS needs its data folder to open): the .mrxs is picked;
    two of them, or two slide files, are refused with the reason."""
    mrxs = tmp_path / "case"
    (mrxs / "slide").mkdir(parents=True)
    (mrxs / "slide.mrxs").write_text("[GENERAL]\n")
    (mrxs / "slide" / "Slidedat.ini").write_text("[GENERAL]\n")
    assert resolve_slide_path(mrxs) == mrxs / "slide.mrxs"
    (mrxs / "other.mrxs").write_text("[GENERAL]\n")
    with pytest.raises(SlideUnreadable, match="2 .mrxs slides"):
        resolve_slide_path(mrxs)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copyfile(small_svs, single / "a.svs")
    with Slide(single) as slide:
        assert slide.dimensions == (16, 16)
    shutil.copyfile(small_svs, single / "b.svs")
    with pytest.raises(SlideUnreadable, match=r"no slide in folder 'single'.*2 slide files"):
        Slide(single)


def test_a_missing_path_names_itself(tmp_path: Path) -> None:
    with pytest.raises(SlideUnreadable, match="no slide file or folder at .*data/dicom"):
        Slide(tmp_path / "data" / "dicom")
