"""Our streaming blend against MONAI's sliding_window_inference, same image, same model.

    python bench/blend.py [--sizes 1536,4096,8192] [--tile 256] [--overlap 64] [--repeats N]
    python bench/blend.py --model identity --sizes 20000   # memory at a size MONAI barely holds

The model is one seeded segmentation-models-pytorch U-Net (ResNet-18 encoder, depth 3),
the same weights for every method; ``--model identity`` runs the identity model instead
(the tile's RGB as three channels): no network time, so that images large enough to
show how each method's memory grows run in minutes, not hours (the canvases, not the
model, are what grows). The image is real H&E (cmu_small_region, mirrored to the size).
Both sides apply the card's activation per window. Methods, each in a fresh process so
that its peak RSS is its own:

- ``monai-constant`` / ``monai-gaussian``: ``sliding_window_inference`` on the image as a
  float tensor in memory (as MONAI users hold it), output canvas in memory, the module
  as built (NCHW, BatchNorm separate).
- ``monai-zarr-avg``: MONAI's ``PatchInferer`` with ``SlidingWindowSplitter`` and
  ``ZarrAvgMerger`` (plain averaging, the only blending it has), the merged values and
  counts in zarr stores on disk instead of memory; the image still in memory.
- ``monai-gaussian-fused``: the same as ``monai-gaussian``, running the module exactly as slidepipe's
  predictor does (BatchNorm folded into the convolutions, channels-last memory), so that
  the difference to slidepipe is the pipeline (reading, blending, writing), not the model.
- ``slidepipe-tent`` / ``slidepipe-gaussian``: ``run_engine`` on the same pixels stored
  as a lossless pyramidal TIFF: it reads tiles from disk, blends chunk by chunk and
  writes uint8 OME-Zarr (whole job timed, inference stage reported too);
  ``slidepipe-gaussian-u16`` / ``-f32`` store uint16 / float32 probabilities
  (``probability_dtype``).

For the smallest size (up to 4096 px) the seam error is measured: mean absolute
difference of each method's class-1 probability from one whole-image pass of the same
model; for MONAI's float output also after rounding to uint8, like for like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import cache_dir, run_child, scratch, settle_disk, table  # noqa: E402

GIB = 2**30
MPP = 1.0
#: The largest image whose seam error is measured (a whole-image pass held in memory).
SEAM_MAX_PX = 4096


def card_for(folder: Path, tile: int, overlap: int, model: str = "unet") -> Path:
    """A seeded 2-class U-Net (or the identity model) written as a model card (cached)."""
    import torch

    from models.architectures import build_module
    from models.card import IMAGENET, ClassSpec, ModelCard
    from models.catalogue import BUILTIN_CARDS
    from models.loading import save_weights

    card_path = folder / "card.json"
    if card_path.is_file():
        return card_path
    if model == "identity":
        card = BUILTIN_CARDS["identity"].model_copy(
            update={"name": "bench-identity", "target_mpp": MPP, "tile_px": tile,
                    "overlap_px": overlap})
        return card.save(folder)
    torch.manual_seed(0)
    card = ModelCard(
        name="bench-unet", architecture="unet", weights="weights.safetensors",
        classes=[ClassSpec(name="a", color="000000"), ClassSpec(name="b", color="FF00FF")],
        target_mpp=MPP, tile_px=tile, overlap_px=overlap, normalization=IMAGENET,
        params={"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
    )
    save_weights(build_module(card), folder / "weights.safetensors")
    return card.save(folder)


def image_for(size: int) -> tuple[Path, Path]:
    """The benchmark image as .npy (for MONAI) and as a lossless slide (for the engine)."""
    import numpy as np

    from workers.demo.sample_data import fetch_cmu_small_region
    from wsi.array_slide import ArraySource
    from wsi.pyramid_tiff import write_pyramidal_tiff
    from wsi.reader import Slide

    npy, slide = cache_dir() / f"blend-{size}.npy", cache_dir() / f"blend-{size}.svs"
    if not (npy.is_file() and slide.is_file()):
        with Slide(fetch_cmu_small_region()) as s:
            rgb = s.read_level(0, 0, 0, *s.dimensions)
        source = ArraySource(rgb)
        image = source(0, 0, 0, size, size)
        np.save(npy, image)
        write_pyramidal_tiff(slide, width=size, height=size, mpp=MPP, tile_source=ArraySource(image),
                             downsamples=(1, 4), compression="deflate")
    return npy, slide


def child_monai(npy: str, card: str, mode: str, out: str) -> None:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from models.card import read_card
    from models.loading import load_model
    from models.predictor import fuse_conv_bn

    c = read_card(Path(card))
    mode, _, variant = mode.partition("+")
    model = load_model(c).module.eval()
    if variant == "fused":  # the module as slidepipe's predictor runs it
        model = fuse_conv_bn(model).to(memory_format=torch.channels_last)
    image = np.load(npy)
    mean = torch.tensor(c.normalization.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(c.normalization.std).view(1, 3, 1, 1) * 255

    def predictor(window: torch.Tensor) -> torch.Tensor:  # the activation per window, as ours
        if variant == "fused":
            window = window.contiguous(memory_format=torch.channels_last)
        out = model(window)
        return torch.softmax(out, 1) if c.activation == "softmax" else out

    start = time.perf_counter()
    with torch.inference_mode(), scratch("blend-monai-") as scratch_dir:
        x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - mean) / std
        if variant == "zarr":  # merged on disk: PatchInferer + ZarrAvgMerger
            from monai.inferers import PatchInferer, SlidingWindowSplitter, ZarrAvgMerger

            inferer = PatchInferer(
                splitter=SlidingWindowSplitter(patch_size=(c.tile_px, c.tile_px),
                                               overlap=c.overlap_px),
                merger_cls=ZarrAvgMerger, batch_size=8,
                store=str(scratch_dir / "merged.zarr"), value_store=str(scratch_dir / "values.zarr"),
                count_store=str(scratch_dir / "counts.zarr"))
            p = np.asarray(inferer(x, predictor)[0, 1])
        else:
            y = sliding_window_inference(x, roi_size=(c.tile_px, c.tile_px), sw_batch_size=8,
                                         predictor=predictor, overlap=c.overlap_px / c.tile_px,
                                         mode=mode, padding_mode="constant", cval=0.0)
            p = y[0, 1].numpy()
    seconds = time.perf_counter() - start
    np.save(out, p.astype(np.float32)) if out != "-" else None
    print(json.dumps({"seconds": seconds}))


def child_ours(slide: str, card: str, window: str, out: str) -> None:
    import numpy as np
    import zarr

    from workers.engine.run import run_engine
    from workers.engine.spec import RunSpec
    from wsi.ome_zarr import full_scale

    window, _, dtype = window.partition("+")
    with scratch("blend-") as folder:
        result = folder / "r.zarr"
        settle_disk()
        start = time.perf_counter()
        r = run_engine(RunSpec(slide_path=Path(slide), model=card, out_path=result, window=window,
                               tissue_method="none", device="cpu", batch_size=8,
                               probability_dtype=dtype or "uint8"))
        seconds = time.perf_counter() - start
        if out != "-":
            stored = np.asarray(zarr.open_group(str(result), mode="r")["0"][1])
            np.save(out, stored.astype(np.float32) / full_scale(stored.dtype))
    print(json.dumps({"seconds": seconds, "infer_s": r.timings_s["infer"]}))


def whole_pass(npy: Path, card: Path) -> object:
    import numpy as np

    from models.card import read_card
    from models.loading import load_model
    from models.predictor import Predictor

    image = np.load(npy)
    predictor = Predictor(load_model(read_card(card)), device="cpu")
    h, w = image.shape[:2]
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    padded = np.zeros((ph, pw, 3), np.uint8)  # MONAI pads with 0 after normalisation
    padded[:h, :w] = image
    outputs = predictor(padded[None])
    return outputs[next(iter(outputs))][0, 1, :h, :w]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1536,4096,8192")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--model", choices=("unet", "identity"), default="unet")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per method, interleaved; times are medians")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, a, b, c, d = args.child
        (child_monai if kind == "monai" else child_ours)(a, b, c, d)
        return
    import numpy as np

    card = card_for(cache_dir() / f"blend-{args.model}-{args.tile}-{args.overlap}", args.tile,
                    args.overlap, args.model)
    methods = [("monai-constant", "monai", "constant"), ("monai-gaussian", "monai", "gaussian"),
               ("monai-zarr-avg", "monai", "constant+zarr"),
               ("monai-gaussian-fused", "monai", "gaussian+fused"),
               ("slidepipe-tent", "ours", "tent"), ("slidepipe-gaussian", "ours", "gaussian"),
               ("slidepipe-gaussian-u16", "ours", "gaussian+uint16"),
               ("slidepipe-gaussian-f32", "ours", "gaussian+float32")]
    rows, figures = [], []
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        npy, slide = image_for(size)
        # the seam reference is one whole-image pass: only for a size that fits beside MONAI
        reference = whole_pass(npy, card) if size == sizes[0] and size <= SEAM_MAX_PX else None
        measured: dict[str, tuple[list[float], int, float | None, float | None]] = {}
        for round_ in range(max(1, args.repeats)):  # methods interleaved, round after round
            for name, kind, mode in methods:
                seam_run = reference is not None and round_ == 0
                out = str(cache_dir() / f"blend-out-{name}.npy") if seam_run else "-"
                src = str(npy) if kind == "monai" else str(slide)
                report, rss = run_child(["bench/blend.py", "--child", kind, src, str(card), mode, out])
                times, peak, seam, seam8 = measured.get(name, ([], 0, None, None))
                if seam_run:
                    p = np.load(out)
                    seam = float(np.abs(p - reference).mean())
                    # like for like: our result is stored as uint8, so quantise theirs too
                    seam8 = float(np.abs(np.rint(p * 255) / 255 - reference).mean())
                measured[name] = ([*times, report["seconds"]], max(peak, rss), seam, seam8)
                figures.append({"size": size, "method": name, "round": round_, "peak_rss": rss,
                                "seam_mae": seam, "seam_mae_uint8": seam8, **report})
        median = {name: statistics.median(m[0]) for name, m in measured.items()}
        base_t, base_rss = median["monai-gaussian"], measured["monai-gaussian"][1]
        fused_t = median["monai-gaussian-fused"]
        for name, (times, rss, seam, seam8) in measured.items():
            rows.append([f"{size:,}", name, f"{median[name]:.1f}",
                         " ".join(f"{t:.1f}" for t in times),
                         f"{base_t / median[name]:.2f}x", f"{fused_t / median[name]:.2f}x",
                         f"{rss / GIB:.2f}", f"{rss / base_rss:.2f}x",
                         "" if seam is None else f"{seam:.6f}",
                         "" if seam8 is None or name.startswith("slidepipe") else f"{seam8:.6f}"])
    print(table(["image px", "method", "median wall s", "runs", "speed vs monai-gaussian",
                 "vs monai-gaussian-fused", "peak RSS GiB", "RSS vs monai-gaussian",
                 "seam MAE", "MONAI's seam MAE rounded to uint8"], rows))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
