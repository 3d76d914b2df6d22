"""Writing results as OME-Zarr (NGFF 0.4, zarr v2 format) that QuPath, napari and
ome-zarr-py open.

Layout of one result::

    result.zarr/                 multiscale image: class probabilities (c, y, x) uint8
      0/ 1/ ...                  pyramid levels, each half the previous
      labels/classes/0 ...       argmax class map (y, x) uint8, colours per class
      labels/tissue/0 ...        tissue mask (y, x) uint8
      thumbnail/0                the slide's RGB thumbnail (c, y, x), for heatmaps
      .zattrs                    multiscales + omero + "slidepipe" provenance

Level 0 is written chunk by chunk by the caller; the coarser levels are made chunk by
chunk as it is written (:mod:`wsi.pyramid_stream`) or afterwards by
:meth:`ResultWriter.build_pyramids`, to the same bytes, so no level is ever held whole.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numcodecs
import numpy as np
import numpy.typing as npt
import zarr

if TYPE_CHECKING:
    from zarr.core.chunk_key_encodings import ChunkKeyEncodingParams
    from zarr.types import AnyArray

_Scalar = TypeVar("_Scalar", bound=np.generic)

NGFF_VERSION = "0.4"
#: lz4 is ~10x faster than zstd here and is zarr-python's own default, so every
#: OME-Zarr reader decodes it; chunk writes sit on the engine's critical path. 64 KiB
#: blocks encode a 512 px RGB chunk in 0.24 ms against 0.41 ms with Blosc's automatic
#: block size, for 1% more bytes (real H&E, 200 chunks); the size is in each chunk's
#: header, so readers need nothing.
COMPRESSOR = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE,
                             blocksize=1 << 16)
CHUNK_KEYS: ChunkKeyEncodingParams = {"name": "v2", "separator": "/"}
#: Told of each chunk file :class:`ChunkFiles` writes: its name below the result's root
#: (``0/0/3/5``, ``labels/classes/0/3/5``) and its encoded bytes (a remote store's
#: worker uploads level-0 chunks with it while the run goes on).
ChunkStored = Callable[[str, bytes], None]


def json_attrs(node: zarr.Group | AnyArray) -> dict[str, Any]:
    """A node's attributes as parsed JSON. zarr types each value as a union of every
    JSON type; a reader that knows the schema (NGFF, our provenance) indexes it as such."""
    return node.attrs.asdict()


def array_at(group: zarr.Group, path: str) -> AnyArray:
    """The array at ``path`` below ``group`` (KeyError: nothing there; TypeError: a group)."""
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{path!r} is a zarr group, expected an array")
    return node


def group_at(group: zarr.Group, path: str) -> zarr.Group:
    """The group at ``path`` below ``group``, or ``group`` itself for ""."""
    if not path:
        return group
    node = group[path]
    if not isinstance(node, zarr.Group):
        raise TypeError(f"{path!r} is a zarr array, expected a group")
    return node


@dataclass(frozen=True)
class ChannelSpec:
    name: str
    color: str  # "RRGGBB"


@dataclass(frozen=True)
class LabelSpec:
    """A label image: value -> (name, RGBA). Value 0 is background (transparent)."""

    name: str
    values: dict[int, tuple[str, tuple[int, int, int, int]]]


class ChunkFiles:
    """Whole-chunk reads and writes of a local zarr v2 array, straight to its files.

    Why: zarr-python 3 spends ~5 ms of Python per ``array[...] = block`` call, ten times
    the cost of encoding and writing the chunk; the engine writes every chunk exactly
    once, whole, so it can use the v2 format directly: the chunk, padded to the full
    chunk shape with the fill value, C order, encoded by the array's compressor, stored at
    ``<array>/<i>/<j>/<k>`` ("/" separator). Chunks equal to the fill value are not
    stored, as zarr does. Files are written in place, without a temporary name and a
    rename per chunk: results are built in a staging folder that is moved into place
    only once complete (``workers.engine.run``), so no reader sees a half-written chunk.
    """

    def __init__(self, array: AnyArray, root: Path) -> None:
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.chunks: tuple[int, ...] = tuple(array.chunks)
        self.dtype = np.dtype(array.dtype)
        self.fill = array.fill_value
        self.folder = Path(root) / array.path
        self.codec = COMPRESSOR
        self._made: set[str] = set()  # chunk folders known to exist
        self._name = str(array.path).strip("/")
        #: called after each chunk file is written (None: nobody is told)
        self.on_stored: ChunkStored | None = None
        #: called with each chunk's index and pixels as it is written
        self.on_data: Callable[[tuple[int, ...], npt.NDArray[Any]], None] | None = None

    def _file(self, index: tuple[int, ...]) -> Path:
        return self.folder.joinpath(*(str(i) for i in index))

    def write(self, index: tuple[int, ...], data: npt.NDArray[np.generic]) -> None:
        """Store chunk ``index``; ``data`` may be smaller at the array's far edges.
        ``on_data`` (the next pyramid level, made as this one is written: see
        :mod:`wsi.pyramid_stream`) sees the chunk first, even one left unstored."""
        if self.on_data is not None:
            self.on_data(index, data)
        self.store(index, data)

    def store(self, index: tuple[int, ...], data: npt.NDArray[np.generic]) -> None:
        """Store chunk ``index`` without telling ``on_data``."""
        if self.fill == 0 and _all_zero(data):
            return
        full = data
        if data.shape != self.chunks:
            full = np.full(self.chunks, self.fill, dtype=self.dtype)
            full[tuple(slice(0, n) for n in data.shape)] = data
        encoded = self.codec.encode(np.ascontiguousarray(full, dtype=self.dtype))
        folder = os.path.join(self.folder, *(str(i) for i in index[:-1]))
        if folder not in self._made:  # one mkdir per chunk row, not one per chunk
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        with open(os.path.join(folder, str(index[-1])), "wb") as fh:
            fh.write(encoded)
        if self.on_stored is not None:
            self.on_stored("/".join([self._name, *(str(i) for i in index)]), bytes(encoded))

    def read(self, index: tuple[int, ...]) -> npt.NDArray[Any]:
        """Chunk ``index`` at full chunk shape (the fill value where none is stored)."""
        target = self._file(index)
        if not target.is_file():
            return np.full(self.chunks, self.fill, dtype=self.dtype)
        raw = self.codec.decode(target.read_bytes())
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.chunks)

    def n_chunks(self) -> tuple[int, ...]:
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunks))


def _all_zero(data: npt.NDArray[np.generic]) -> bool:
    """Whether every value is 0: for unsigned types ``max() == 0``, one SIMD pass ~3x
    faster than ``any()`` on a 512 px chunk (which converts to bool first)."""
    if data.dtype.kind == "u":
        return data.size == 0 or int(data.max()) == 0
    return not data.any()


def pyramid_shapes(height: int, width: int, chunk_px: int) -> list[tuple[int, int]]:
    """Level shapes, halving (rounding up) until the level fits one chunk."""
    shapes = [(height, width)]
    while max(shapes[-1]) > chunk_px:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def hex_to_rgba(color: str, alpha: int = 255) -> tuple[int, int, int, int]:
    c = color.lstrip("#")
    if len(c) != 6:
        raise ValueError(f"colour must be RRGGBB, got {color!r}")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16), alpha


def _axes(with_channel: bool) -> list[dict[str, str]]:
    space = [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    return ([{"name": "c", "type": "channel"}] if with_channel else []) + space


def multiscales_attrs(
    name: str, n_levels: int, mpp: float, *, with_channel: bool, downsampling: str
) -> list[dict[str, Any]]:
    datasets = []
    for level in range(n_levels):
        scale = [mpp * 2**level] * 2
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": ([1.0] if with_channel else []) + scale}
                ],
            }
        )
    return [
        {
            "version": NGFF_VERSION,
            "name": name,
            "axes": _axes(with_channel),
            "datasets": datasets,
            "type": downsampling,
        }
    ]


def full_scale(dtype: npt.DTypeLike) -> float:
    """The stored value that stands for 1 (probability 1, full intensity): the type's
    maximum for unsigned integers, 1.0 for floats."""
    dtype = np.dtype(dtype)
    return 1.0 if dtype.kind == "f" else float(np.iinfo(dtype).max)


def downsample_mean(block: npt.NDArray[_Scalar]) -> npt.NDArray[_Scalar]:
    """2x2 mean over the last two axes, edge-replicating odd sizes (uint8, uint16 or
    float32 in and out, the same type; integers rounded)."""
    h, w = block.shape[-2:]
    pad = [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)]
    if h % 2 or w % 2:
        block = np.pad(block, pad, mode="edge")
    planes = block.reshape(-1, *block.shape[-2:])
    size = (planes.shape[2] // 2, planes.shape[1] // 2)
    # OpenCV's area resize at exactly 1/2 is (a + b + c + d + 2) >> 2, the rounded mean,
    # six times faster than the same sum in numpy's uint16
    reduced = [cv2.resize(plane, size, interpolation=cv2.INTER_AREA) for plane in planes]
    return np.stack(reduced).reshape(*block.shape[:-2], size[1], size[0])


def downsample_nearest(block: npt.NDArray[_Scalar]) -> npt.NDArray[_Scalar]:
    return block[..., 0::2, 0::2]


class ResultWriter:
    """Creates the arrays of one result and its NGFF metadata.

    ``height``/``width`` are the output canvas in pixels of ``mpp`` micrometres.
    """

    def __init__(self, path: Path, *, height: int, width: int, mpp: float, chunk_px: int) -> None:
        self.path = Path(path)
        self.height, self.width, self.mpp, self.chunk_px = height, width, mpp, chunk_px
        self.shapes = pyramid_shapes(height, width, chunk_px)
        self.root = zarr.open_group(str(self.path), mode="w", zarr_format=2)
        self._images: dict[str, tuple[str, int, str]] = {}  # group path -> (name, channels, kind)
        self._labels: dict[str, LabelSpec] = {}

    @classmethod
    def reopen(cls, path: Path, *, height: int, width: int, mpp: float,
               chunk_px: int) -> ResultWriter:
        """The writer of a result created earlier, perhaps by another process: a split
        run's last step builds the pyramids of arrays that its parts filled. Which groups
        are images and labels is read back from their NGFF metadata."""
        writer = cls.__new__(cls)
        writer.path = Path(path)
        writer.height, writer.width, writer.mpp, writer.chunk_px = height, width, mpp, chunk_px
        writer.shapes = pyramid_shapes(height, width, chunk_px)
        writer.root = zarr.open_group(str(writer.path), mode="r+", zarr_format=2)
        writer._images, writer._labels = {}, {}
        groups = [("", writer.root), *(item for item in writer.root.groups() if item[0] != "labels")]
        for group_path, group in groups:
            omero = json_attrs(group).get("omero")
            if omero:
                writer._images[group_path] = (omero["name"], len(omero["channels"]), "mean")
        labels = group_at(writer.root, "labels") if "labels" in writer.root else None
        for name in json_attrs(labels).get("labels", []) if labels is not None else []:
            meta = json_attrs(group_at(writer.root, f"labels/{name}"))["image-label"]
            names = {p["label-value"]: p["class"] for p in meta["properties"]}
            writer._labels[name] = LabelSpec(name, {
                c["label-value"]: (names[c["label-value"]], tuple(c["rgba"]))
                for c in meta["colors"]})
        return writer

    def _create(self, group_path: str, n_channels: int | None, dtype: str = "uint8") -> AnyArray:
        group = self.root.require_group(group_path) if group_path else self.root
        for level, (h, w) in enumerate(self.shapes):
            shape = (n_channels, h, w) if n_channels else (h, w)
            chunks = (n_channels, self.chunk_px, self.chunk_px) if n_channels else (
                self.chunk_px, self.chunk_px)
            group.create_array(
                str(level),
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                fill_value=0,
                compressors=COMPRESSOR,
                chunk_key_encoding=CHUNK_KEYS,
            )
        return array_at(group, "0")

    def create_image(self, group_path: str, name: str, channels: Sequence[ChannelSpec],
                     dtype: str = "uint8") -> AnyArray:
        """A (c, y, x) multiscale image (uint8 unless said) at ``group_path`` ("" is the
        root); viewers' display window spans 0 to :func:`full_scale`."""
        array = self._create(group_path, len(channels), dtype)
        top = full_scale(dtype)
        top = int(top) if top > 1 else top
        group = self.root[group_path] if group_path else self.root
        group.attrs["multiscales"] = multiscales_attrs(
            name, len(self.shapes), self.mpp, with_channel=True, downsampling="mean"
        )
        group.attrs["omero"] = {
            "name": name,
            "version": NGFF_VERSION,
            "channels": [
                {
                    "label": ch.name,
                    "color": ch.color.lstrip("#").upper(),
                    "active": True,
                    "coefficient": 1,
                    "family": "linear",
                    "inverted": False,
                    "window": {"start": 0, "end": top, "min": 0, "max": top},
                }
                for ch in channels
            ],
            "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0},
        }
        self._images[group_path] = (name, len(channels), "mean")
        return array

    def create_label(self, spec: LabelSpec) -> AnyArray:
        """A (y, x) uint8 label image under ``labels/<name>`` with colours per value."""
        array = self._create(f"labels/{spec.name}", None)
        group = self.root[f"labels/{spec.name}"]
        group.attrs["multiscales"] = multiscales_attrs(
            spec.name, len(self.shapes), self.mpp, with_channel=False, downsampling="nearest"
        )
        group.attrs["image-label"] = {
            "version": NGFF_VERSION,
            "colors": [
                {"label-value": value, "rgba": list(rgba)}
                for value, (_, rgba) in sorted(spec.values.items())
            ],
            "properties": [
                {"label-value": value, "class": label_name}
                for value, (label_name, _) in sorted(spec.values.items())
            ],
            "source": {"image": "../../"},
        }
        self._labels[spec.name] = spec
        self.root.require_group("labels").attrs["labels"] = sorted(self._labels)
        return array

    def write_small_image(
        self, group_path: str, name: str, rgb: npt.NDArray[np.uint8], mpp: float
    ) -> None:
        """A single-level RGB image (e.g. the slide thumbnail), stored as (c, y, x)."""
        group = self.root.require_group(group_path)
        data = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
        group.create_array(
            "0", shape=data.shape, chunks=data.shape, dtype="uint8", fill_value=0,
            compressors=COMPRESSOR, chunk_key_encoding=CHUNK_KEYS,
        )[...] = data
        group.attrs["multiscales"] = multiscales_attrs(
            name, 1, mpp, with_channel=True, downsampling="mean"
        )

    def write_tile_grid(
        self, group_path: str, grid: npt.NDArray[np.float32], channels: Sequence[ChannelSpec],
        *, scale_um: float, offset_um: float,
    ) -> None:
        """A (c, rows, cols) float32 image with one pixel per tile (NaN: not computed)."""
        group = self.root.require_group(group_path)
        group.create_array(
            "0", shape=grid.shape, chunks=grid.shape, dtype="float32", fill_value=float("nan"),
            compressors=COMPRESSOR, chunk_key_encoding=CHUNK_KEYS,
        )[...] = grid
        multiscales = multiscales_attrs(group_path, 1, scale_um, with_channel=True,
                                        downsampling="mean")
        multiscales[0]["datasets"][0]["coordinateTransformations"].append(
            {"type": "translation", "translation": [0.0, offset_um, offset_um]}
        )
        group.attrs["multiscales"] = multiscales
        group.attrs["channels"] = [ch.name for ch in channels]

    def set_attrs(self, key: str, value: Any) -> None:
        self.root.attrs[key] = value

    # -- pyramid --------------------------------------------------------------------------
    def chunk_files(self, array: AnyArray) -> ChunkFiles:
        return ChunkFiles(array, self.path)

    def _reduce_chunk(self, src: ChunkFiles, dst: ChunkFiles, cy: int, cx: int, mean: bool) -> None:
        """Chunk (cy, cx) of a level from the 2x2 chunks of the level below it."""
        lead = (0,) * (len(src.chunks) - 2)
        n_sy, n_sx = src.n_chunks()[-2:]
        parts = [
            [src.read((*lead, sy, sx)) if sy < n_sy and sx < n_sx else None
             for sx in (2 * cx, 2 * cx + 1)]
            for sy in (2 * cy, 2 * cy + 1)
        ]
        if all(p is None or not p.any() for row in parts for p in row):
            return  # stays at the fill value; background chunks are never stored
        c = self.chunk_px
        block = np.zeros((*src.chunks[:-2], 2 * c, 2 * c), dtype=src.dtype)
        for i, row in enumerate(parts):
            for j, part in enumerate(row):
                if part is not None:
                    block[..., i * c : (i + 1) * c, j * c : (j + 1) * c] = part
        # crop to the valid source extent so edge replication uses real pixels
        sh, sw = src.shape[-2:]
        block = block[..., : max(0, min(2 * c, sh - 2 * cy * c)), : max(0, min(2 * c, sw - 2 * cx * c))]
        reduced = downsample_mean(block) if mean else downsample_nearest(block)
        dh, dw = dst.shape[-2:]
        reduced = reduced[..., : min(c, dh - cy * c), : min(c, dw - cx * c)]
        dst.write((*lead, cy, cx), reduced)

    def build_pyramids(self, workers: int = 2, skip: Collection[str] = ()) -> None:
        """Derive levels 1.. of every image and label from level 0, chunk by chunk;
        not those of the groups in ``skip`` (made as level 0 was written:
        :mod:`wsi.pyramid_stream`)."""
        groups = [(p, True) for p in self._images] + [(f"labels/{n}", False) for n in self._labels]
        groups = [(p, mean) for p, mean in groups if p not in skip]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for group_path, mean in groups:
                group = group_at(self.root, group_path)
                for level in range(1, len(self.shapes)):
                    src = self.chunk_files(array_at(group, str(level - 1)))
                    dst = self.chunk_files(array_at(group, str(level)))
                    n_cy, n_cx = dst.n_chunks()[-2:]
                    reduce_chunk = partial(self._reduce_chunk, src, dst, mean=mean)
                    for cy in range(n_cy):  # a row of futures at a time, not the whole level's
                        list(pool.map(reduce_chunk, [cy] * n_cx, range(n_cx)))
