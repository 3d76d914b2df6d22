"""``slidepipe train {unet,joint}``: train a segmenter into a model folder.

The folder (``--out``) ends up with ``card.json`` + ``weights.safetensors`` (what
``slidepipe run`` and the service load: put it under ``SLIDEPIPE_MODEL_DIR`` to run it
by name), ``checkpoint.pt`` (``--resume`` continues from it), ``metrics.jsonl`` and
``training.json``. The work itself is ``workers.training.segmentation.run_training``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import click
from tqdm import tqdm

from service.cli_engine import USER_ERRORS


@contextmanager
def train_errors() -> Iterator[None]:
    try:
        yield
    except (*USER_ERRORS, FileExistsError, ValueError) as err:
        raise click.ClickException(f"{type(err).__name__}: {err}") from err


def _floats(value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from err


def train_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Model folder to write (card, weights, checkpoint, metrics)."),
        click.option("--name", help="Card name (default: the folder's name)."),
        click.option("--classes", multiple=True, help="Class names in order, comma-separated or repeated; name:RRGGBB sets a colour."),
        click.option("--tiles", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Tile folder: images/ and optional masks/ (repeatable)."),
        click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="CSV of patch labels (image,label[,group]) for the first --tiles folder."),
        click.option("--slides", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Slide with <stem>.geojson (QuPath) or <stem>.mask.png beside it (repeatable)."),
        click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="CSV: slide[,annotations][,patient][,split]."),
        click.option("--mpp", type=float, help="Training resolution, µm/px (default: the card's)."),
        click.option("--tile-size", "tile_px", type=int, help="Patch size in px (default: the card's)."),
        click.option("--stride", "stride_px", type=int, help="Patch grid stride on slides (default: the patch size)."),
        click.option("--min-tissue", type=float, default=0.75, show_default=True, help="Keep slide patches with at least this tissue fraction."),
        click.option("--unannotated", help="Class of unannotated slide pixels (default: ignored)."),
        click.option("--label-rule", callback=lambda _c, _p, v: _floats(v), help="Patch label from a mask: the highest class reaching its minimum fraction, one per class (e.g. 0,0.5,0.15); default: majority."),
        click.option("--mask-fraction", type=float, default=1.0, show_default=True, help="Keep masks on this fraction of the training patches; the rest keep their labels only."),
        click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Share of slides/patients held out for validation."),
        click.option("--aggregate", type=click.Choice(["majority", "aggnet"]), help="Labels from several annotators (masks/<annotator>/..., <slide stem>.annotators/<annotator>.geojson|.mask.png, or a CSV with an annotator column), aggregated by majority vote or by AggNet's EM inside training."),
        click.option("--em-every", type=click.IntRange(min=0), default=0, show_default=True, help="--aggregate aggnet: training steps per EM round (one M-step of the annotators' sensitivity and specificity); 0: one epoch (training patches / batch size), as AggNet."),
        click.option("--gold-annotator", help="--aggregate aggnet: the annotator whose answers are the truth (gold questions)."),
        click.option("--gold-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="--aggregate aggnet: tau, how far the others' estimates are pulled towards their agreement with the gold annotator."),
        click.option("--steps", type=int, default=1000, show_default=True),
        click.option("--batch-size", type=int, help="Default: 20 (joint), 16 (unet)."),
        click.option("--lr", type=float, help="Adam learning rate. Default: 1e-4 (joint), 1e-3 (unet)."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--schedule", "lr_schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--no-augment", is_flag=True, help="No flips/rotations/colour augmentation."),
        click.option("--eval-every", type=int, default=50, show_default=True),
        click.option("--checkpoint-every", type=int, default=50, show_default=True),
        click.option("--resume", is_flag=True, help="Continue the checkpoint in --out."),
        click.option("--overwrite", is_flag=True, help="Start again over an existing checkpoint."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group("train")
def train_group() -> None:
    """Train a segmenter (unet, joint) from tiles, label CSVs or annotated slides."""


def _run(architecture: str, *, batch_size: int | None, lr: float | None, steps: int,
         weight_decay: float, lr_schedule: Literal["constant", "cosine"], seed: int, device: str, no_augment: bool,
         eval_every: int, checkpoint_every: int, quiet: bool, classes: tuple[str, ...],
         label_rule: tuple[float, ...] | None, fit_extra: dict[str, Any],
         spec_extra: dict[str, Any], **data: Any) -> None:
    from models.seg_training import FitConfig
    from workers.training.segmentation import TrainSpec, parse_classes, run_training

    defaults = {"joint": (20, 1e-4), "unet": (16, 1e-3)}[architecture]
    with train_errors():
        fit = FitConfig(
            steps=steps, batch_size=batch_size or defaults[0], lr=lr or defaults[1],
            weight_decay=weight_decay, lr_schedule=lr_schedule, seed=seed, device=device,
            augment=not no_augment, eval_every=eval_every, checkpoint_every=checkpoint_every,
            **fit_extra)
        spec = TrainSpec(architecture=architecture, classes=tuple(parse_classes(classes)),
                         label_rule=label_rule, fit=fit, tiles=tuple(data.pop("tiles")),
                         slides=tuple(data.pop("slides")), **data, **spec_extra)
        bar = tqdm(total=steps, desc="train", unit="step", disable=quiet)
        postfix: dict[str, str] = {}

        def on_step(step: int, row: dict[str, float]) -> None:
            bar.n = step
            postfix["loss"] = f"{row['loss']:.3f}"
            bar.set_postfix(postfix)

        def on_eval(step: int, row: dict[str, float]) -> None:
            for key in ("val_seg_mean_dice", "val_cls_accuracy"):
                if row.get(key) is not None:
                    postfix[key.removeprefix("val_")] = f"{row[key]:.3f}"
            bar.set_postfix(postfix)

        try:
            result = run_training(spec, on_step=on_step, on_eval=on_eval)
        finally:
            bar.close()
    final = result.fit.last_eval or {}
    shown = ", ".join(f"{k.removeprefix('val_')} {v:.3f}" for k, v in final.items()
                      if k in ("val_seg_mean_dice", "val_seg_mean_iou", "val_cls_accuracy",
                               "val_cls_macro_f1", "val_seg_bach_score", "val_cls_bach_score")
                      and v is not None)
    click.echo(f"wrote {result.card_path} ({result.data['train']['patches']} training patches, "
               f"{result.fit.steps} steps in {result.seconds:.0f}s)"
               + (f"; validation: {shown}" if shown else ""))
    if spec.aggregate is not None:
        click.echo(f"annotators ({spec.aggregate}): see `slidepipe models show "
                   f"{result.card_path}`")


@train_group.command("unet")
@train_options
@click.option("--encoder", help="segmentation-models-pytorch encoder (default resnet18).")
@click.option("--dice-weight", type=float, default=0.0, show_default=True, help="Add soft Dice to cross-entropy.")
def train_unet(encoder: str | None, dice_weight: float, **options: Any) -> None:
    """Train a U-Net (segmentation-models-pytorch) on masks."""
    _run("unet", fit_extra={"dice_weight": dice_weight}, spec_extra={"encoder": encoder},
         **options)


@train_group.command("joint")
@train_options
@click.option("--cls-weight", type=float, default=1.0, show_default=True, help="Weight of L_cls.")
@click.option("--masked-per-batch", type=int, help="Patches with masks in each batch (default: half).")
@click.option("--classifier", type=click.Choice(["head", "max"]), default="head", show_default=True, help="Class logits from the segmentation map: the paper's head (pool + conv 8 + conv) or the per-class max of the map, as the authors' code runs it.")
def train_joint(cls_weight: float, masked_per_batch: int | None, classifier: str,
                **options: Any) -> None:
    """Train the joint classification-segmentation network (Ciga & Martel) on masks and
    patch class labels. The label-only patches of a batch go through the network in a
    pass of their own, which leaves BatchNorm's running statistics to the masked ones."""
    _run("joint", fit_extra={"cls_weight": cls_weight, "masked_per_batch": masked_per_batch},
         spec_extra={"classifier": classifier}, **options)


COMMANDS = (train_group,)
