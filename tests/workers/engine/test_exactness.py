"""With the identity model, a tiled, blended run reproduces the slide's own pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from models.card import ModelCard
from models.catalogue import BUILTIN_CARDS
from workers.engine.run import run_engine
from workers.engine.spec import RunSpec
from wsi.reader import Slide


def _result(path: Path) -> tuple[np.ndarray, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return np.asarray(root["0"]), np.asarray(root["labels/classes/0"])


def _reference(slide_path: Path, target_mpp: float, backend: str) -> np.ndarray:
    with Slide(slide_path, backend=backend) as slide:
        mpp = slide.grid_mpp(target_mpp)
        width, height = slide.scaled_dimensions(mpp)
        return np.moveaxis(slide.read_scaled(mpp, 0, 0, width, height), -1, 0)


@pytest.mark.parametrize(
    ("slide_key", "backend", "target_mpp", "tile_px", "overlap_px"),
    [
        ("svs", "openslide", 0.5, 256, 32),  # level 0, tiles + chunks do not divide 1500x1300
        ("svs", "tiffslide", 0.5, 200, 0),  # no overlap at all
        ("svs", "openslide", 2.0, 128, 48),  # level 1 (4x) read as is
        ("svs", "tiffslide", 1.0, 160, 40),  # resampled 2x from level 0
        ("tiff3", "tiffslide", 0.75, 256, 64),  # non-power-of-two level (3x)
        ("tiff3", "openslide", 0.25, 300, 100),  # generic TIFF level 0
    ],
)
def test_identity_reproduces_pixels(
    engine_slides: dict[str, Path], tmp_path: Path, slide_key: str, backend: str,
    target_mpp: float, tile_px: int, overlap_px: int,
) -> None:
    slide = engine_slides[slide_key]
    out = tmp_path / "r.zarr"
    result = run_engine(RunSpec(
        slide_path=slide, model="identity", out_path=out, backend=backend,
        target_mpp=target_mpp, tile_px=tile_px, overlap_px=overlap_px, chunk_px=192,
        tissue_method="none", device="cpu",
    ))
    probabilities, labels = _result(out)
    reference = _reference(slide, target_mpp, backend)
    assert probabilities.shape == reference.shape
    covered = labels > 0
    assert covered.all(), "with tissue_method=none every pixel is covered by some tile"
    diff = np.abs(probabilities.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 1, f"max abs difference {diff.max()} grey levels"
    assert result.tiles_total > 1


def test_identity_exact_inside_tissue_tiles(engine_slides: dict[str, Path], tmp_path: Path) -> None:
    """With the default tissue mask only tissue tiles are computed; inside them the
    output equals the slide, outside them it is background (label 0, zeros)."""
    slide = engine_slides["svs"]
    out = tmp_path / "r.zarr"
    result = run_engine(RunSpec(slide_path=slide, model="identity", out_path=out, device="cpu",
                                tile_px=128, overlap_px=16))
    probabilities, labels = _result(out)
    reference = _reference(slide, 0.5, "auto")
    covered = labels > 0
    assert 0.05 < covered.mean() < 1.0
    diff = np.abs(probabilities.astype(np.int16) - reference)[:, covered]
    assert diff.max() <= 1
    assert not probabilities[:, ~covered].any()
    # 1500 x 1300 px, 128 px tiles at stride 112: ceil((1500-128)/112)+1 = 14 columns,
    # ceil((1300-128)/112)+1 = 12 rows; the glass among them is skipped
    assert result.provenance["tiles"]["grid"] == [12, 14]
    assert 0 < result.tiles_total < 12 * 14


def test_crop_and_stride_geometry(engine_slides: dict[str, Path], tmp_path: Path) -> None:
    """A model that drops 16 px per side and halves the resolution: the kept centres
    tile the slide edge to edge and the output sits at twice the target mpp."""
    card = BUILTIN_CARDS["identity"].model_copy(
        update={"name": "identity-crop", "output_crop_px": 16, "output_stride": 2,
                "tile_px": 160, "overlap_px": 64, "target_mpp": 0.5}
    )
    card_path = ModelCard.model_validate(card.model_dump()).save(tmp_path / "card")
    out = tmp_path / "r.zarr"
    run_engine(RunSpec(slide_path=engine_slides["small"], model=str(card_path), out_path=out,
                       tissue_method="none", device="cpu", chunk_px=64))
    probabilities, labels = _result(out)
    reference = _reference(engine_slides["small"], 1.0, "auto")  # 2x2 means of level 0
    assert probabilities.shape == (3, 260, 350)
    assert (labels > 0).all()
    diff = np.abs(probabilities.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 1, f"max abs difference {diff.max()}"
    scale = zarr.open_group(str(out), mode="r").attrs["multiscales"][0]["datasets"][0]
    assert scale["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0]


def test_compiled_model_and_default_batch_give_the_same_result(
    engine_slides: dict[str, Path], tmp_path: Path,
) -> None:
    """``compile`` (torch.compile, inductor on CPU) changes speed, not pixels; with no batch
    size given the CPU default is used and recorded."""
    common = {"slide_path": engine_slides["svs"], "model": "identity", "device": "cpu",
              "tissue_method": "none", "chunk_px": 256}
    eager = run_engine(RunSpec(out_path=tmp_path / "eager.zarr", batch_size=5, **common))
    compiled = run_engine(RunSpec(out_path=tmp_path / "compiled.zarr", compile=True, **common))
    assert compiled.provenance["effective"]["compile"] is True
    assert compiled.provenance["effective"]["batch_size"] == 8
    assert eager.provenance["effective"]["batch_size"] == 5
    for a, b in zip(_result(eager.out_path), _result(compiled.out_path)):
        assert a.shape == b.shape
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1
