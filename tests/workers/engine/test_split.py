"""One slide split into parts (workers/engine/parts.py) gives the one-part run's result
byte for byte: every chunk file of every array (level 0, pyramids, labels, tile grids,
thumbnail) and every metadata file, provenance aside. Parts run in reverse order here,
as workers may take them; one part fails half-way and is run again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.architectures import build_module
from models.catalogue import BUILTIN_CARDS
from models.loading import save_weights
from workers.engine.part_table import chunk_touches, owned_chunks, plan_parts
from workers.engine.parts import finish, parts_done, prepare, run_part
from workers.engine.run import run_engine
from workers.engine.spec import Progress, RunSpec
from workers.engine.staging import RECORD_SUFFIX
from wsi.tiling import TileGeometry, plan_tiles


def result_files(root: Path) -> dict[str, bytes]:
    """Every file of a result by its relative path; the root attributes without the
    provenance (times, timings and, for a split, the parts)."""
    files = {p.relative_to(root).as_posix(): p.read_bytes()
             for p in sorted(root.rglob("*")) if p.is_file()}
    attrs = json.loads(files.pop(".zattrs"))
    assert "slidepipe" in attrs
    attrs.pop("slidepipe")
    files[".zattrs (no provenance)"] = json.dumps(attrs, sort_keys=True).encode()
    return files


def assert_same_result(whole: Path, split: Path) -> None:
    a, b = result_files(whole), result_files(split)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    differing = [name for name in a if a[name] != b[name]]
    assert not differing, f"{len(differing)} files differ, e.g. {differing[:5]}"
    assert sum(name.count("/") >= 2 for name in a) > 20, "chunk files were compared"


def split_run(spec: RunSpec, n_parts: int, fail_part: int | None = None) -> list[int]:
    """prepare, the parts last to first (``fail_part`` dies half-way once, then runs
    again), finish; the parts' run-tile counts."""
    prepared = prepare(spec, parts=n_parts)
    assert len(prepared.parts) == n_parts, prepared.parts
    for index in reversed(range(n_parts)):
        if index == fail_part:
            def die_half_way(p: Progress) -> None:
                if p.stage == "infer" and 2 * p.done >= p.total > 0:
                    raise RuntimeError("worker lost")
            with pytest.raises(RuntimeError, match="worker lost"):
                run_part(prepared.staged, index, progress=die_half_way)
            assert index not in parts_done(prepared.staged)
        run_part(prepared.staged, index)
    assert parts_done(prepared.staged) == list(range(n_parts))
    result = finish(prepared.staged)
    record = prepared.staged.with_name(prepared.staged.name + RECORD_SUFFIX)
    assert not record.exists() and not prepared.staged.exists()
    assert len(result.provenance["split"]["parts"]) == n_parts
    return [prepared.tiles_run(i) for i in range(n_parts)]


def _spec(slide: Path, out: Path, **values: object) -> RunSpec:
    base: dict[str, object] = dict(device="cpu", target_mpp=0.5, tile_px=64, overlap_px=16,
                                   chunk_px=64, batch_size=8)
    base.update(values)
    return RunSpec(slide_path=slide, out_path=out, **base)  # type: ignore[arg-type]


def test_identity_split_in_2_and_3_parts_equals_one_run(
    engine_slides: dict[str, Path], tmp_path: Path
) -> None:
    """Real tissue (Otsu mask) over 11 chunk rows and two strips."""
    slide = engine_slides["svs"]
    run_engine(_spec(slide, tmp_path / "whole.zarr", model="identity", target_mpp=1.0))
    for n in (2, 3):
        out = tmp_path / f"split{n}.zarr"
        tiles = split_run(_spec(slide, out, model="identity", target_mpp=1.0), n,
                          fail_part=1 if n == 3 else None)
        assert_same_result(tmp_path / "whole.zarr", out)
        whole = json.loads((tmp_path / "whole.zarr/.zattrs").read_text())["slidepipe"]
        assert max(tiles) < whole["tiles"]["total"], "each part runs fewer tiles than the whole"
        # the one-part run made its pyramids while storing level 0, the split built them
        # from level 0 afterwards: the same bytes either way
        assert whole["pyramids_streamed"] == ["", "labels/classes", "labels/tissue"]
        split = json.loads((out / ".zattrs").read_text())["slidepipe"]
        assert split["pyramids_streamed"] == ["labels/tissue"]  # written whole by finish


@pytest.fixture(scope="module")
def cnn_cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded, randomly initialised CNNs saved as real cards + weights: a small U-Net
    (dense output) and the joint model (dense + per-tile scores, for the tile grids)."""
    folder = tmp_path_factory.mktemp("split-cnns")
    cards = {}
    updates: dict[str, dict[str, Any]] = {
        "unet": {"params": {"encoder_name": "resnet18", "encoder_depth": 3,
                            "decoder_channels": [32, 16, 8]}},
        "joint": {"target_mpp": 4.0},
    }
    for name, update in updates.items():
        torch.manual_seed(0)
        card = BUILTIN_CARDS[name].model_copy(
            update={"name": f"{name}-split", "weights": "weights.safetensors", **update})
        (folder / name).mkdir()
        save_weights(build_module(card), folder / name / "weights.safetensors")
        cards[name] = card.save(folder / name)
    return cards


@pytest.mark.parametrize(("model", "n_parts", "target_mpp", "tile_px"),
                         [("unet", 3, 2.0, 64), ("joint", 2, 2.0, 64)])
def test_cnn_split_equals_one_run(engine_slides: dict[str, Path], cnn_cards: dict[str, Path],
                                  tmp_path: Path, model: str, n_parts: int,
                                  target_mpp: float, tile_px: int) -> None:
    """Real convolutions, batches of 4: each part runs the whole run's own batches."""
    slide = engine_slides["svs"]
    values = dict(model=str(cnn_cards[model]), target_mpp=target_mpp, tile_px=tile_px,
                  overlap_px=tile_px // 4, batch_size=4)
    run_engine(_spec(slide, tmp_path / "whole.zarr", **values))
    split_run(_spec(slide, tmp_path / "split.zarr", **values), n_parts)
    assert_same_result(tmp_path / "whole.zarr", tmp_path / "split.zarr")
    if model == "joint":
        assert (tmp_path / "split.zarr/tile_scores/0").is_dir()


@pytest.mark.parametrize(("overlap_px", "n_parts"), [(32, 2), (32, 4), (0, 3), (48, 5)])
def test_part_table_owns_every_chunk_once(overlap_px: int, n_parts: int) -> None:
    """Own batches partition the run; every touched chunk is owned by one part whose run
    range holds every tile touching it; no part is larger than the whole."""
    g = TileGeometry(tile_px=128, overlap_px=overlap_px)
    plan = plan_tiles(width=2048, height=896, target_mpp=1.0, slide_mpp=1.0, geometry=g,
                      mask=None, strip_px=576 if overlap_px else 512)
    batch, chunk = 3, 64
    parts = plan_parts(plan, chunk, batch, n_parts)
    n_batches = -(-len(plan.tiles) // batch)
    assert 2 <= len(parts) <= n_parts
    assert [p.own_batches[0] for p in parts][1:] == [p.own_batches[1] for p in parts][:-1]
    assert parts[0].own_batches[0] == 0 and parts[-1].own_batches[1] == n_batches
    first, last = chunk_touches(plan, chunk)
    owners = np.zeros(first.shape, int)
    for p in parts:
        own = owned_chunks(last, p.own_tiles(batch, len(plan.tiles)))
        owners += own
        lo, hi = p.run_tiles(batch, len(plan.tiles))
        assert (first[own] >= lo).all() and (last[own] < hi).all()
        assert p.run_batches[1] == p.own_batches[1] and p.run_batches[0] <= p.own_batches[0]
    np.testing.assert_array_equal(owners, (last >= 0).astype(int))
    largest = max(p.run_batches[1] - p.run_batches[0] for p in parts)
    assert largest < n_batches
    if overlap_px == 0:  # strips share no chunk: the parts run disjoint batches
        assert sum(p.run_batches[1] - p.run_batches[0] for p in parts) == n_batches
