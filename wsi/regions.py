"""Connected regions of a label image as exact pixel-edge polygons, traced band by band.

A region is a set of pixels of one value connected through edges or corners
(8-connectivity). Its polygon follows the pixels' outer edges, so its area is its pixel
count, and a pixel lies inside it exactly when it belongs to the region; enclosed pixels
of other values are interior rings (holes).

How: a band of ``h`` rows is drawn at twice the resolution, each pixel as the closed
3 x 3 block of doubled coordinates 2i..2i+2, so that OpenCV's border following passes
through the pixels' corners; its diagonal shortcuts at concave corners are put back
onto the grid and collinear points dropped, all vectorised. Regions that touch a band's
edge stay open and are joined with the next band's (union-find over the labels of the
two rows that meet, 8-connected), then merged with ``shapely.union_all``: their pieces
share the band edge exactly. Memory: one band (and its doubled mask) plus the open
regions, never the image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import cv2
import numpy as np
import numpy.typing as npt
import shapely

log = logging.getLogger(__name__)

#: Pixels of the doubled band traced at once (a 32 MiB image).
BAND_PIXELS = 1 << 25

BandReader = Callable[[int, int], npt.NDArray[np.uint8]]
WeightReader = Callable[[int, int, int], npt.NDArray[Any]]


@dataclass
class Region:
    """One finished region: its value, polygon (label-image pixels), pixel count and
    the sum of the weight image over its pixels (0 without one)."""

    value: int
    geometry: shapely.Geometry
    pixels: int
    weight_sum: float


@dataclass
class _Open:
    """A region still touching the last band's bottom row."""

    value: int
    pieces: list[shapely.Geometry] = field(default_factory=list)
    pixels: int = 0
    weight_sum: float = 0.0


def _double(mask: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Each pixel (i, j) as the block 2i..2i+2 x 2j..2j+2 of a (2h+1, 2w+1) image."""
    h, w = mask.shape
    doubled = np.zeros((2 * h + 1, 2 * w + 1), np.uint8)
    doubled[:-1, :-1] = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)
    return np.asarray(cv2.dilate(doubled, np.ones((2, 2), np.uint8), anchor=(1, 1)), np.uint8)


def _rings(contours: Sequence[npt.NDArray[np.int32]], doubled: npt.NDArray[np.uint8]
           ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Rings in doubled units from OpenCV contours (CHAIN_APPROX_NONE) of the doubled
    image, flat: (points (n, 2), the ring of each point, each ring's first point).
    Diagonal steps through a concave corner go round it on the grid; points between
    collinear steps are dropped."""
    lengths = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    points = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
    ring_of = np.repeat(np.arange(len(contours)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    firsts = points[starts]
    nxt = np.arange(1, len(points) + 1)
    nxt[starts + lengths - 1] = starts  # cyclic within each ring
    q = points[nxt]
    diagonal = (q[:, 0] != points[:, 0]) & (q[:, 1] != points[:, 1])
    # a diagonal step p -> q cuts the corner (q.x, p.y) or (p.x, q.y): the drawn one
    use_a = doubled[points[:, 1].clip(0, doubled.shape[0] - 1),
                    q[:, 0].clip(0, doubled.shape[1] - 1)] > 0
    corner = np.empty_like(points)
    corner[:, 0] = np.where(use_a, q[:, 0], points[:, 0])
    corner[:, 1] = np.where(use_a, points[:, 1], q[:, 1])
    # interleave: each point, then its corner where its step is diagonal
    both = np.empty((2 * len(points), 2), np.int64)
    both[0::2], both[1::2] = points, corner
    keep = np.ones(2 * len(points), bool)
    keep[1::2] = diagonal
    ring_ids = np.repeat(ring_of, 2)[keep]
    pts = both[keep]
    # drop points whose incoming and outgoing steps have the same direction
    counts = np.bincount(ring_ids, minlength=len(contours))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nxt = np.arange(1, len(pts) + 1)
    nxt[starts + counts - 1] = starts
    prv = np.empty_like(nxt)
    prv[nxt] = np.arange(len(pts))
    turn = (np.sign(pts[nxt] - pts) != np.sign(pts - pts[prv])).any(axis=1)
    return pts[turn], ring_ids[turn], firsts


def trace_band(mask: npt.NDArray[np.uint8], labels: npt.NDArray[np.int32], y0: int
               ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.object_]]:
    """Polygons of the 8-connected components of ``mask`` (a band starting at row
    ``y0``), one per component: (component labels from ``labels``, polygons). Polygons
    may be invalid where a region touches itself at a corner (the caller repairs)."""
    doubled = _double(mask)
    contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros(0, np.int64), np.zeros(0, object)
    tree = hierarchy[0]
    pts, ring_ids, first = _rings(cast(Sequence[npt.NDArray[np.int32]], contours), doubled)
    shell = tree[:, 3] < 0
    owner = np.where(shell, np.arange(len(tree)), tree[:, 3])
    # each shell's label: a pixel of the band under the shell's first point
    h, w = mask.shape
    label_of = np.zeros(len(tree), np.int64)
    for di in (0, 1):
        for dj in (0, 1):
            i = np.clip(first[:, 1] // 2 - di, 0, h - 1)
            j = np.clip(first[:, 0] // 2 - dj, 0, w - 1)
            hit = (label_of == 0) & (mask[i, j] > 0)
            label_of[hit] = labels[i[hit], j[hit]]
    order = np.lexsort((~shell, owner))  # each polygon's shell first, then its holes
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    by_ring = np.argsort(rank[ring_ids], kind="stable")
    coords = pts[by_ring] / 2.0
    coords[:, 1] += y0
    linear = np.asarray(shapely.linearrings(coords, indices=rank[ring_ids][by_ring]),
                        dtype=object)  # rings are closed by shapely
    shells = np.flatnonzero(shell)
    polygons = shapely.polygons(linear, indices=np.searchsorted(shells, owner[order]))
    return label_of[shells], np.asarray(polygons, dtype=object)


def repair(geometries: npt.NDArray[np.object_]) -> npt.NDArray[np.object_]:
    """Valid geometries: ``make_valid`` (structure) where a ring touches itself."""
    valid = shapely.is_valid(geometries)
    if valid.all():
        return geometries
    out = geometries.copy()
    out[~valid] = shapely.make_valid(geometries[~valid], method="structure", keep_collapsed=False)
    return out


def band_rows(width: int) -> int:
    """Rows traced at once: the doubled band stays near :data:`BAND_PIXELS` pixels."""
    return int(max(8, BAND_PIXELS // (4 * max(1, width))))


def trace_regions(
    read: BandReader,
    *,
    height: int,
    width: int,
    values: Sequence[int],
    rows: int,
    weights: WeightReader | None = None,
    weight_scale: float = 1.0,
) -> Iterator[Region]:
    """Every 8-connected region of each of ``values`` in a ``height`` x ``width`` label
    image, yielded once complete. The image is read in blocks of ``rows`` rows
    (``read(y0, y1)``; best a whole row of the array's chunks) and traced in bands of
    :func:`band_rows`; ``weights(value, y0, y1)`` (a block of the same rows) times
    ``weight_scale`` is summed over each region's pixels."""
    open_regions: dict[int, dict[int, _Open]] = {v: {} for v in values}
    last_row: dict[int, npt.NDArray[np.int32]] = {}
    step = band_rows(width)
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        block = read(y0, y1)
        for value in values:
            block_weights = weights(value, y0, y1) if weights is not None else None
            for b0 in range(y0, y1, step):
                b1 = min(y1, b0 + step)
                mask = (block[b0 - y0 : b1 - y0] == value).astype(np.uint8)
                band_weights = None
                if block_weights is not None:
                    band_weights = block_weights[b0 - y0 : b1 - y0].astype(np.float64)
                    band_weights *= weight_scale
                yield from _band_regions(value, mask, b0, b1 == height, open_regions[value],
                                         last_row, band_weights)
        log.debug("traced rows %d-%d of %d", y0, y1, height)
    for value in values:
        for region in {id(r): r for r in open_regions[value].values()}.values():
            yield _finish(region)


def _band_regions(value: int, mask: npt.NDArray[np.uint8], y0: int, last_band: bool,
                  previous: dict[int, _Open], last_row: dict[int, npt.NDArray[np.int32]],
                  weights: npt.NDArray[np.float64] | None) -> Iterator[Region]:
    """This band's regions of ``value``: those complete are yielded, those reaching the
    next band are left in ``previous`` (keyed by their labels in this band's last row)."""
    n, components = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
    labels = np.asarray(components, dtype=np.int32)
    prev_row = last_row.get(value)
    last_row[value] = labels[-1].copy()
    olds = list({id(r): r for r in previous.values()}.values())
    key_of_old = {id(r): -(i + 1) for i, r in enumerate(olds)}
    parent: dict[int, int] = {}  # union-find: old regions -(i + 1), this band's labels k

    def find(k: int) -> int:
        root = k
        while parent.get(root, root) != root:
            root = parent[root]
        parent[k] = root
        return root

    joined = np.zeros(n, bool)
    if prev_row is not None and previous:
        top = labels[0]
        for shift in (-1, 0, 1):  # 8-connected across the band edge
            a = prev_row[max(0, -shift): len(top) - max(0, shift)]
            b = top[max(0, shift): len(top) - max(0, -shift)]
            both = (a > 0) & (b > 0)
            for pa, pb in set(zip(a[both].tolist(), b[both].tolist(), strict=True)):
                if pa not in previous:
                    continue
                ra, rb = find(key_of_old[id(previous[pa])]), find(pb)
                if ra != rb:
                    parent[ra] = rb
                joined[pb] = True
    touching = np.zeros(n, bool)
    if not last_band:
        touching[np.unique(labels[-1])] = True
    touching[0] = False
    groups: dict[int, _Open] = {}
    reaches_below: set[int] = set()
    if n > 1:
        pixels = np.bincount(labels.ravel(), minlength=n)
        sums = np.zeros(n)
        if weights is not None:
            sums = np.asarray(np.bincount(labels.ravel(), weights=weights.ravel(), minlength=n),
                              dtype=np.float64)
        ids, polygons = trace_band(mask, labels, y0)
        alone = ~joined[ids] & ~touching[ids]  # complete within this band
        if alone.any():
            done = repair(polygons[alone])
            for k, geometry in zip(ids[alone].tolist(), done, strict=True):
                yield Region(value, geometry, int(pixels[k]), float(sums[k]))
        for k, geometry in zip(ids[~alone].tolist(), polygons[~alone], strict=True):
            root = find(k)
            group = groups.setdefault(root, _Open(value))
            group.pieces.append(geometry)
            group.pixels += int(pixels[k])
            group.weight_sum += float(sums[k])
            if touching[k]:
                reaches_below.add(root)
    for old in olds:
        root = find(key_of_old[id(old)])
        group = groups.setdefault(root, _Open(value))
        group.pieces.extend(old.pieces)
        group.pixels += old.pixels
        group.weight_sum += old.weight_sum
    previous.clear()
    for root, group in groups.items():
        if root not in reaches_below:
            yield _finish(group)
    for k in np.flatnonzero(touching).tolist():
        previous[k] = groups[find(k)]


def _finish(region: _Open) -> Region:
    pieces = region.pieces
    geometry = pieces[0] if len(pieces) == 1 else shapely.union_all(pieces)
    fixed = repair(np.asarray([geometry], dtype=object))[0]
    return Region(region.value, fixed, region.pixels, region.weight_sum)
