"""The pyramidal TIFF writer and the scene sources behind the built test slides."""


from pathlib import Path

import pytest

from tests.scenes import Rect, RectangleSource
from wsi.errors import (
    InvalidParameter,
)
from wsi.pyramid_tiff import write_pyramidal_tiff


# -- the writer behind the built slides ---------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"downsamples": (2, 4)}, "starting with 1"),
        ({"downsamples": (1, 2.5)}, "integers"),
        ({"downsamples": (1, 4, 4)}, "increase"),
        ({"tile_px": 100}, "multiple of 16"),
        ({"compression": "lzw"}, "compression"),
        ({"flavor": "ndpi"}, "flavor"),
        ({"flavor": "generic", "downsamples": (1, 4, 8)}, "powers of one factor"),
        ({"mpp": 0.0}, "mpp"),
        ({"width": 0}, "size"),
    ],
)
def test_synthetic_writer_rejects_bad_geometry(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {"width": 64, "height": 64, "mpp": 0.5}
    args.update(kwargs)
    source = RectangleSource(64, 64, ())
    with pytest.raises(InvalidParameter, match=match):
        write_pyramidal_tiff(tmp_path / "x.svs", tile_source=source, **args)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir()), "nothing is left behind"


def test_rectangle_source_rejects_overlaps() -> None:
    with pytest.raises(InvalidParameter, match="overlap"):
        RectangleSource(100, 100, (Rect(0, 0, 50, 50), Rect(40, 40, 20, 20)))
