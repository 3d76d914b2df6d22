"""What the readers of a result (exports, reports, heatmaps, the viewer) need to know about
it, from its NGFF metadata and provenance: classes and colours, grid, resolutions, slide.

Coordinates: result pixel (x, y) covers level-0 slide pixels ``x * scale`` to
``(x + 1) * scale`` with ``scale = output_mpp / slide_mpp``; both grids start at the
slide's top-left corner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from wsi.ome_zarr import array_at, json_attrs

#: The label group of the argmax class map (0 = not computed) and of the tissue mask.
CLASSES_LABEL = "labels/classes"
TISSUE_LABEL = "labels/tissue"


@dataclass(frozen=True)
class ClassInfo:
    """A class of the result: its label value in ``labels/classes`` (channel + 1)."""

    value: int
    name: str
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class ResultInfo:
    path: Path
    classes: tuple[ClassInfo, ...]
    height: int
    width: int
    output_mpp: float
    slide_mpp: float | None
    slide_dimensions: tuple[int, int] | None  # level 0, (width, height)
    slide_name: str
    model_name: str
    finished: str
    warnings: tuple[str, ...] = ()
    tissue_rgb: tuple[int, int, int] = (0, 200, 0)
    provenance: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def scale(self) -> float:
        """Level-0 slide pixels per result pixel (1 when the slide's mpp is unknown)."""
        return self.output_mpp / self.slide_mpp if self.slide_mpp else 1.0

    @property
    def level0_size(self) -> tuple[int, int]:
        """The slide's level-0 (width, height), or the result's extent in its pixels."""
        if self.slide_dimensions is not None:
            return self.slide_dimensions
        return round(self.width * self.scale), round(self.height * self.scale)

    def class_named(self, name: str) -> ClassInfo:
        for cls in self.classes:
            if cls.name == name:
                return cls
        choices = ", ".join(c.name for c in self.classes)
        raise KeyError(f"no class {name!r} in this result; classes are {choices}")


def hex_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _label_colour(root: zarr.Group, group: str, value: int) -> tuple[int, int, int] | None:
    if group not in root:
        return None
    for entry in json_attrs(root[group]).get("image-label", {}).get("colors", []):
        if entry.get("label-value") == value:
            r, g, b = entry["rgba"][:3]
            return int(r), int(g), int(b)
    return None


def read_result_info(path: Path) -> tuple[zarr.Group, ResultInfo]:
    """The result's root group and what its metadata say (KeyError: not a class result)."""
    root = zarr.open_group(str(path), mode="r")
    attrs = json_attrs(root)
    channels = attrs.get("omero", {}).get("channels", [])
    classes = tuple(ClassInfo(i + 1, ch["label"], hex_rgb(ch.get("color", "808080")))
                    for i, ch in enumerate(channels))
    provenance: dict[str, Any] = dict(attrs.get("slidepipe", {}))
    scale = attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    slide = provenance.get("slide", {})
    dims = slide.get("dimensions")
    height, width = array_at(root, "0").shape[-2:]
    return root, ResultInfo(
        path=Path(path),
        classes=classes,
        height=int(height),
        width=int(width),
        output_mpp=float(scale[-1]),
        slide_mpp=float(slide["mpp"]) if slide.get("mpp") else None,
        slide_dimensions=(int(dims[0]), int(dims[1])) if dims else None,
        slide_name=str(slide.get("name", Path(path).stem)),
        model_name=str(provenance.get("model_card", {}).get("name", "unknown model")),
        finished=str(provenance.get("finished", "")),
        warnings=tuple(str(w) for w in provenance.get("warnings", []) or []),
        tissue_rgb=_label_colour(root, TISSUE_LABEL, 1) or (0, 200, 0),
        provenance=provenance,
    )


def has_class_map(root: zarr.Group) -> bool:
    return f"{CLASSES_LABEL}/0" in root
