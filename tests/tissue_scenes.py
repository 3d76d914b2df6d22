"""Slides of real tissue with strands, fragments and artefacts pasted at known places.

The tissue is the real H&E of ``cmu_small_region.svs`` (crops of it, mirrored to fill a
shape); glass, pen strokes, dust, an air bubble's rim and the slide's edge are painted.
Every object's pixels are known, so a tissue mask (and the tiles planned from it) can be
scored exactly: :func:`build_scene` returns the level-0 image, one label per object and
the reference tissue, and :func:`write_scene` writes it as a pyramidal SVS through the
product's writer.

Reference tissue. Inside a pasted shape, a pixel is tissue where the source H&E is
stained by :func:`reference_tissue` (chroma of at least 20 after a 2.5 µm median, pieces
of at least 50 µm², at level 0): the glass between collagen fibres of a real crop is
glass here too. The same rule makes the reference of the whole CMU slide.

Layout (µm, on a 3500 x 2500 µm slide at 0.5 µm/px; :data:`OBJECTS` has every number):
a main piece (ellipse 1100 x 900), two strands attached to it (15 and 40 µm wide) and
three detached ones (20 µm pale, 30 and 50 µm), five fragments of 300-2000 µm² (one on
the slide's left border), blue, green and black marker strokes on glass at least 175 µm
from any tissue, twelve dust specks, a bubble's rim and a dark band at the slide's edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from wsi.array_slide import write_slide_from_array
from wsi.pyramid_tiff import PyramidInfo

MPP = 0.5
SIZE_UM = (3500, 2500)
GLASS = (243, 242, 244)
#: Marker inks as scanned (RGB).
INKS = {"blue": (55, 85, 175), "green": (45, 135, 95), "black": (38, 38, 44)}

TISSUE_KINDS = ("main", "strand", "fragment")
ARTEFACT_KINDS = ("pen", "dust", "bubble", "edge")


@dataclass(frozen=True)
class SceneObject:
    """One pasted or painted object; geometry in µm."""

    name: str
    kind: str  # main, strand, fragment, pen, dust, bubble, edge
    points: tuple[tuple[float, float], ...]  # a polyline (strand, pen), or the centre
    size_um: float  # width of a strand or stroke, radius of a blob, area of a fragment
    pale: bool = False  # tissue blended half-way to glass (faint eosin)


def _strand(name: str, width: float, x0: float, x1: float, y: float, wobble: float,
            pale: bool = False) -> SceneObject:
    xs = np.linspace(x0, x1, 9)
    pts = tuple((float(x), float(y + wobble * np.sin((x - x0) / 70.0))) for x in xs)
    return SceneObject(name, "strand", pts, width, pale)


#: Every object of the scene. Tissue first; the names are what the reports print.
OBJECTS: tuple[SceneObject, ...] = (
    SceneObject("main piece", "main", ((900.0, 1100.0),), 0.0),
    _strand("strand 15 µm (attached)", 15, 1440, 1840, 1100, 25),
    SceneObject("strand 40 µm (attached)", "strand",
                ((900.0, 665.0), (860.0, 520.0), (760.0, 380.0), (700.0, 250.0)), 40),
    _strand("strand 20 µm, pale", 20, 2000, 2400, 300, 20, pale=True),
    _strand("strand 30 µm", 30, 2000, 2400, 550, 30),
    SceneObject("strand 50 µm", "strand", ((1700.0, 250.0), (1800.0, 650.0)), 50),
    SceneObject("fragment 300 µm²", "fragment", ((2700.0, 300.0),), 300),
    SceneObject("fragment 500 µm²", "fragment", ((2900.0, 300.0),), 500),
    SceneObject("fragment 1000 µm²", "fragment", ((3100.0, 320.0),), 1000),
    SceneObject("fragment 2000 µm²", "fragment", ((2850.0, 600.0),), 2000),
    SceneObject("fragment 500 µm² (slide border)", "fragment", ((8.0, 150.0),), 500),
    SceneObject("blue pen", "pen", ((1900.0, 1950.0), (2600.0, 1850.0), (3300.0, 1900.0)), 350),
    SceneObject("green pen", "pen", ((2150.0, 950.0), (2700.0, 1100.0), (3300.0, 1250.0)), 250),
    SceneObject("black pen", "pen", ((200.0, 1900.0), (800.0, 2050.0), (1500.0, 2150.0)), 250),
    SceneObject("bubble rim", "bubble", ((2350.0, 1430.0),), 170),
    SceneObject("slide edge", "edge", ((0.0, 2440.0), (3500.0, 2440.0)), 60),
)
#: Dust specks: (x, y, radius) in µm, on glass away from everything else.
DUST: tuple[tuple[float, float, float], ...] = (
    (150, 400, 6), (250, 1650, 12), (1650, 1400, 8), (1700, 800, 15), (2100, 1300, 5),
    (2600, 700, 10), (3350, 700, 20), (3300, 1600, 9), (1200, 300, 7), (300, 2350, 14),
    (2000, 2300, 11), (3000, 2300, 18),
)


@dataclass(frozen=True)
class Scene:
    """The level-0 image, a label per object (0 = glass; i + 1 = ``objects[i]``; dust
    specks share one label) and the reference tissue."""

    rgb: np.ndarray = field(repr=False)  # (h, w, 3) uint8
    labels: np.ndarray = field(repr=False)  # (h, w) uint8
    tissue: np.ndarray = field(repr=False)  # (h, w) bool: reference tissue
    objects: tuple[SceneObject, ...] = field(repr=False)
    dust_label: int = 0

    @property
    def mpp(self) -> float:
        return MPP

    def object_mask(self, index: int) -> np.ndarray:
        """The reference pixels of ``objects[index]`` (tissue objects: its tissue)."""
        m = self.labels == index + 1
        return m & self.tissue if self.objects[index].kind in TISSUE_KINDS else m


def reference_tissue(rgb: np.ndarray, mpp: float = MPP) -> np.ndarray:
    """Stained pixels at full resolution: chroma >= 20 after a 5 px (2.5 µm) median,
    pieces of at least 50 µm² (grey dust and glass noise have less chroma)."""
    chroma = (rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)).astype(np.uint8)
    stained = (cv2.medianBlur(chroma, 5) >= 20).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(stained, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] * mpp * mpp >= 50
    keep[0] = False
    return keep[labels]


def _px(v: float) -> int:
    return int(round(v / MPP))


def _polyline(points: tuple[tuple[float, float], ...]) -> np.ndarray:
    return np.array([[_px(x), _px(y)] for x, y in points], np.int32).reshape(-1, 1, 2)


def _blob(centre: tuple[float, float], area_um2: float, rng: np.random.Generator
          ) -> tuple[int, int, np.ndarray]:
    """An irregular blob of about ``area_um2`` (a circle with a wavy radius)."""
    radius = np.sqrt(area_um2 / np.pi) / MPP
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = radius * (1 + 0.18 * np.sin(3 * angles + rng.uniform(0, 6)))
    cx, cy = _px(centre[0]), _px(centre[1])
    poly = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    return _filled(lambda m, off: cv2.fillPoly(m, [(poly - off).round().astype(np.int32)], 1),
                   cx, cy, int(radius * 1.3) + 2)


def _filled(draw: Callable[[np.ndarray, np.ndarray], object], cx: int, cy: int, reach: int
            ) -> tuple[int, int, np.ndarray]:
    """(y0, x0, mask) of what ``draw`` paints within ``reach`` px of (cx, cy); ``draw``
    gets the crop and the crop's (x0, y0) offset."""
    x0, y0 = cx - reach, cy - reach
    m = np.zeros((2 * reach + 1, 2 * reach + 1), np.uint8)
    draw(m, np.array([x0, y0]))
    return y0, x0, m.astype(bool)


class _Texture:
    """A crop of real tissue mirrored without end, with its reference tissue."""

    def __init__(self, source: np.ndarray) -> None:
        tile = np.concatenate([source, source[::-1]], 0)
        self.tile = np.ascontiguousarray(np.concatenate([tile, tile[:, ::-1]], 1))
        self.ref = reference_tissue(self.tile)

    def at(self, y0: int, x0: int, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The texture's pixels and reference under ``m`` placed at (y0, x0)."""
        ys, xs = np.nonzero(m)
        ty, tx = (ys + y0) % self.tile.shape[0], (xs + x0) % self.tile.shape[1]
        return self.tile[ty, tx], self.ref[ty, tx]


def _shape_mask(obj: SceneObject, shape: tuple[int, int], rng: np.random.Generator
                ) -> tuple[int, int, np.ndarray]:
    """(y0, x0, mask) of the object's pixels, ``mask`` a crop that may run off the slide."""
    if obj.kind == "fragment":
        return _blob(obj.points[0], obj.size_um, rng)
    if obj.kind == "edge":
        y0 = _px(obj.points[0][1])
        return y0, 0, np.ones((shape[0] - y0, shape[1]), bool)
    pts = _polyline(obj.points)
    if obj.kind == "main":
        reach = _px(560)
        return _filled(lambda m, off: cv2.ellipse(m, tuple(int(v) for v in pts[0, 0] - off),
                                                  (_px(550), _px(450)), 15, 0, 360, 1, -1),
                       int(pts[0, 0, 0]), int(pts[0, 0, 1]), reach)
    if obj.kind == "bubble":
        return _filled(lambda m, off: cv2.circle(m, tuple(int(v) for v in pts[0, 0] - off),
                                                 _px(obj.size_um), 1, thickness=_px(8)),
                       int(pts[0, 0, 0]), int(pts[0, 0, 1]), _px(obj.size_um) + _px(8))
    # strand or pen: a thick polyline
    lo, hi = pts.min(axis=(0, 1)), pts.max(axis=(0, 1))
    half = _px(obj.size_um) // 2 + 2
    x0, y0 = int(lo[0]) - half, int(lo[1]) - half
    m = np.zeros((int(hi[1] - lo[1]) + 2 * half + 1, int(hi[0] - lo[0]) + 2 * half + 1),
                 np.uint8)
    cv2.polylines(m, [pts - np.array([x0, y0], np.int32)], False, 1,
                  thickness=max(1, _px(obj.size_um)))
    return y0, x0, m.astype(bool)


def _clip(y0: int, x0: int, m: np.ndarray, shape: tuple[int, int]
          ) -> tuple[tuple[slice, slice], np.ndarray, int, int]:
    """The slide's slices under a crop placed at (y0, x0), the crop's part inside, and
    that part's origin."""
    h, w = shape
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + m.shape[0], h), min(x0 + m.shape[1], w)
    return (slice(ya, yb), slice(xa, xb)), m[ya - y0 : yb - y0, xa - x0 : xb - x0], ya, xa


def _paint(rgb: np.ndarray, m: np.ndarray, obj: SceneObject, rng: np.random.Generator
           ) -> np.ndarray:
    """Ink (or a bubble's dark rim) over the crop ``m`` of ``rgb``, with soft edges;
    returns where it shows (alpha above 0.05)."""
    alpha = cv2.GaussianBlur(m.astype(np.float32), (0, 0), 2.0)  # anti-aliased edge
    if obj.kind == "pen":
        noise = cv2.GaussianBlur(rng.random(m.shape).astype(np.float32), (0, 0), 25)
        noise = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-6)
        alpha *= 0.8 + 0.2 * noise  # uneven ink
        colour = np.array(INKS[obj.name.split()[0]], np.float32)
    else:
        alpha *= 0.6
        colour = np.full(3, 80, np.float32)
    a = alpha[..., None]
    rgb[:] = np.clip(rgb.astype(np.float32) * (1 - a) + colour * a + 0.5, 0, 255).astype(np.uint8)
    shows: np.ndarray = alpha > 0.05
    return shows


def build_scene(cmu_rgb: np.ndarray, seed: int = 17) -> Scene:
    """The scene at level 0 from the real H&E pixels of ``cmu_small_region.svs``."""
    rng = np.random.default_rng(seed)
    w, h = _px(SIZE_UM[0]), _px(SIZE_UM[1])
    shape = (h, w)
    # glass: sensor noise (a 509 px patch repeated) and uneven illumination
    patch = rng.normal(0, 1.5, (509, 509)).astype(np.float32)
    noise = np.tile(patch, (-(-h // 509), -(-w // 509)))[:h, :w]
    noise -= np.linspace(0, 4, w, dtype=np.float32)[None, :]
    rgb = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        rgb[..., c] = np.clip(noise + (GLASS[c] + 0.5), 0, 255).astype(np.uint8)
    del noise
    labels = np.zeros(shape, np.uint8)
    tissue = np.zeros(shape, bool)
    body = _Texture(cmu_rgb[1950:2950, 600:1800])  # a real section, gaps and all
    stroma = _Texture(cmu_rgb[2350:2950, 650:1000])  # epithelium and stroma
    for i, obj in enumerate(OBJECTS):
        where, m, y0, x0 = _clip(*_shape_mask(obj, shape, rng), shape)
        if obj.kind in TISSUE_KINDS:
            pixels, ref = (body if obj.kind == "main" else stroma).at(y0, x0, m)
            if obj.pale:
                pixels = (0.5 * pixels + 0.5 * np.array(GLASS) + 0.5).astype(np.uint8)
            rgb[where][m] = pixels
            tissue[where][m] = ref
        elif obj.kind in ("pen", "bubble"):
            pad = 12  # room for the soft edge
            big = np.zeros((m.shape[0] + 2 * pad, m.shape[1] + 2 * pad), bool)
            big[pad:-pad, pad:-pad] = m
            where, m, y0, x0 = _clip(y0 - pad, x0 - pad, big, shape)
            m = _paint(rgb[where], m, obj, rng)
        elif obj.kind == "edge":
            ramp_y = np.linspace(200, 40, m.shape[0]).astype(np.uint8)
            rgb[where] = ramp_y[:, None, None]
        labels[where][m] = i + 1
    dust_label = len(OBJECTS) + 1
    for x, y, r in DUST:
        reach = max(1, _px(r))
        y0, x0, spot = _filled(lambda m, off, reach=reach: cv2.circle(m, (reach, reach), reach,
                                                                      1, -1),
                               _px(x), _px(y), reach)
        where, spot, _, _ = _clip(y0, x0, spot, shape)
        grey = int(rng.integers(60, 110))
        rgb[where][spot] = (grey, grey, grey + 4)
        labels[where][spot] = dust_label
    return Scene(rgb=rgb, labels=labels, tissue=tissue, objects=OBJECTS, dust_label=dust_label)


def write_scene(scene: Scene, path: str | Path, quality: int = 80) -> PyramidInfo:
    """The scene as a JPEG SVS pyramid (1/4/16: 0.5, 2 and 8 µm/px), like a scanner's."""
    return write_slide_from_array(path, scene.rgb, mpp=MPP, downsamples=(1, 4, 16),
                                  flavor="svs", quality=quality)
