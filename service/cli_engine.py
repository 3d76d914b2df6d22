"""CLI commands that run the engine locally: ``run``, ``heatmap``, ``models``, ``demo``.

They need no broker and no server. Errors from ``wsi``/``models`` become one-line
messages with a non-zero exit status instead of tracebacks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from models.errors import ModelError
from workers.engine.params import ENGINE_PARAMS, Param
from workers.engine.spec import Progress, RunCancelled, RunSpec
from wsi.errors import SlideError

USER_ERRORS = (SlideError, ModelError, RunCancelled, FileNotFoundError)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into ``click`` errors (exit status 1, no traceback)."""
    try:
        yield
    except USER_ERRORS as err:
        raise click.ClickException(f"{type(err).__name__}: {err}") from err


class ProgressBar:
    """A tqdm bar per stage, fed by the engine's progress callback."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: tqdm | None = None

    def __call__(self, p: Progress) -> None:
        if not self.enabled or p.stage != "infer":
            if p.stage != self.stage:
                self.close()
                self.stage = p.stage
            return
        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = tqdm(total=p.total, desc="tiles", unit="tile")
        assert self.bar is not None
        self.bar.total = p.total
        self.bar.n = p.done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _click_type(param: Param) -> click.ParamType | None:
    """The click type of a declared parameter: a range type where it has limits, so that
    ``--batch-size 0`` is a usage error naming the option (the engine checks it too)."""
    if param.type is Path:
        return click.Path(path_type=Path, exists=param.must_exist,
                          dir_okay=not param.must_exist)
    if param.choices:
        return click.Choice(param.choices)
    if param.type in (int, float):
        low = param.ge if param.ge is not None else param.gt
        high = param.le if param.le is not None else param.lt
        min_open, max_open = param.gt is not None, param.lt is not None
        if param.type is int:
            return click.IntRange(None if low is None else int(low),
                                  None if high is None else int(high),
                                  min_open=min_open, max_open=max_open)
        return click.FloatRange(low, high, min_open=min_open, max_open=max_open)
    return None  # str: free text (the device's pattern is checked by RunSpec)


def param_option(param: Param) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One ``slidepipe run`` option from the declaration: ``--tile-px`` (plus the old
    spellings), type and limits, default, and help with the unit."""
    unit = f" Unit: {param.unit}." if param.unit else ""
    if param.type is bool:
        # a flag that is on by default needs a way off: --pen-filter/--no-pen-filter
        flag = f"{param.flag}/--no-{param.flag[2:]}" if param.default else param.flag
        return click.option(flag, *param.aliases, param.name, is_flag=True,
                            default=param.default, show_default=bool(param.default),
                            help=param.help)
    return click.option(param.flag, *param.aliases, param.name, type=_click_type(param),
                        default=param.default, show_default=param.default is not None,
                        envvar=param.envvar, show_envvar=param.envvar is not None,
                        help=param.help + unit)


def run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Every declared engine parameter as an option of ``slidepipe run``."""
    for param in reversed(ENGINE_PARAMS):
        f = param_option(param)(f)
    return f


@click.command("run")
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Built-in model name or path to a model card JSON.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Result .zarr to write.")
@run_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--export-tiff", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the result's RGB image (a cyclegan model's output, or "
              "--stain-output) as a pyramidal SVS that slide viewers open.")
def run_command(slide: Path, model: str, out_path: Path, quiet: bool,
                export_tiff: Path | None = None, **options: Any) -> None:
    """Run MODEL over SLIDE's tissue and write an OME-Zarr result."""
    from workers.engine.run import run_engine

    bar = ProgressBar(enabled=not quiet)
    with user_errors():
        spec = RunSpec(slide_path=slide, model=model, out_path=out_path, **options)
        try:
            result = run_engine(spec, progress=bar)
        finally:
            bar.close()
    click.echo(
        f"wrote {result.out_path} ({result.tiles_total} tiles, classes: "
        f"{', '.join(result.classes)}) in {sum(result.timings_s.values()):.1f}s"
    )
    for warning in result.warnings:
        click.secho(f"warning: {warning}", err=True, fg="yellow")
    if export_tiff is not None:
        from wsi.tiff_export import export_rgb_tiff

        with user_errors():
            info = export_rgb_tiff(result.out_path, export_tiff)
        width, height = info.dimensions
        click.echo(f"wrote {info.path} ({width} x {height} px, {info.mpp:g} µm/px, "
                   f"{len(info.downsamples)} levels)")


@click.command("heatmap")
@click.argument("result", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--class", "class_name", help="Class to show (default: the last class).")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="PNG to write.")
@click.option("--max-size", "max_px", type=int, default=1024, show_default=True)
@click.option("--no-overlay", is_flag=True, help="Colour map only, without the slide thumbnail.")
def heatmap_command(result: Path, class_name: str | None, out_path: Path, max_px: int, no_overlay: bool) -> None:
    """Render one class of RESULT (a slidepipe .zarr) as a PNG heatmap."""
    from wsi.heatmap import render_heatmap_png

    with user_errors():
        try:
            png = render_heatmap_png(result, class_name=class_name, max_px=max_px, overlay=not no_overlay)
        except KeyError as err:
            raise click.ClickException(str(err.args[0])) from err
    out_path.write_bytes(png)
    click.echo(f"wrote {out_path}")


@click.group("models")
def models_group() -> None:
    """Model cards and architectures."""


@models_group.command("list")
@click.option("--model-dir", type=click.Path(path_type=Path), envvar="SLIDEPIPE_MODEL_DIR")
@click.option("--json", "as_json", is_flag=True, help="Print the cards as JSON.")
def models_list(model_dir: Path | None, as_json: bool) -> None:
    """Every model this installation can run, with its parameter count."""
    from models.architectures import build_module, count_parameters
    from models.catalogue import list_model_cards

    cards = list_model_cards(model_dir)
    if as_json:
        click.echo(json.dumps([c.model_dump(mode="json") for c in cards], indent=2))
        return
    for card in cards:
        n = count_parameters(build_module(card))
        click.echo(
            f"{card.name:<16} {card.architecture:<9} {n:>11,} params  "
            f"{card.target_mpp:g} µm/px  tile {card.tile_px}/{card.overlap_px}  "
            f"classes: {', '.join(card.class_names)}"
        )


@models_group.command("init")
@click.argument("architecture", metavar="NAME", type=click.Choice(["unet", "joint"]))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model folder to write (card.json + weights.safetensors).")
@click.option("--classes", multiple=True, help="Class names in order, comma-separated or repeated; name:RRGGBB sets a colour (default: the built-in card's).")
@click.option("--name", help="Card name (default: the folder's name, so SLIDEPIPE_MODEL_DIR finds it).")
@click.option("--mpp", "target_mpp", type=float, help="Resolution the model runs at, µm/px.")
@click.option("--tile-size", "tile_px", type=int, help="Tile size in px.")
@click.option("--encoder", help="unet: segmentation-models-pytorch encoder (default resnet18).")
@click.option("--classifier", type=click.Choice(["head", "max"]), help="joint: the paper's classification head (default) or the per-class max of the segmentation map.")
@click.option("--seed", type=int, default=0, show_default=True)
def models_init(architecture: str, out_dir: Path, classes: tuple[str, ...], name: str | None,
                target_mpp: float | None, tile_px: int | None, encoder: str | None,
                classifier: str | None, seed: int) -> None:
    """Write a NAME (unet, joint) card with freshly initialised weights to --out: a
    starting point for training, and what smoke tests and benchmarks run."""
    from workers.training.segmentation import init_model, parse_classes

    if (out_dir / "card.json").exists():
        raise click.ClickException(f"{out_dir / 'card.json'} already exists")
    with user_errors():
        try:
            card_path, n = init_model(architecture, out_dir, name=name,
                                      classes=parse_classes(classes), seed=seed,
                                      target_mpp=target_mpp, tile_px=tile_px, encoder=encoder,
                                      classifier=classifier)
        except ValueError as err:  # pydantic: a bad name, colour or size
            raise click.ClickException(str(err)) from err
    click.echo(f"wrote {card_path} ({architecture}, {n:,} params, seed {seed})")


@models_group.command("show")
@click.argument("card_ref", metavar="CARD")
@click.option("--model-dir", type=click.Path(path_type=Path), envvar="SLIDEPIPE_MODEL_DIR")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def models_show(card_ref: str, model_dir: Path | None, as_json: bool) -> None:
    """One model card (a name, a card JSON or its folder): what it runs, and the
    annotators it was trained from with their sensitivity, specificity and spammer
    score per class."""
    from models.card import read_card
    from models.catalogue import resolve_card

    with user_errors():
        card = (read_card(Path(card_ref)) if Path(card_ref).exists()
                else resolve_card(card_ref, model_dir))
    if as_json:
        click.echo(json.dumps(card.model_dump(mode="json"), indent=2))
        return
    click.echo(f"{card.name} ({card.architecture}) {card.target_mpp:g} µm/px, tile "
               f"{card.tile_px}/{card.overlap_px}, classes: {', '.join(card.class_names)}")
    if card.description:
        click.echo(card.description)
    if card.params:
        click.echo(f"params: {json.dumps(card.params)}")
    if card.crowd is None:
        click.echo("trained from one set of labels (no annotators recorded)")
        return
    click.echo(f"annotators ({card.crowd.aggregate}; per class: sensitivity alpha / "
               "specificity beta / spammer score S = (alpha + beta - 1)^2, 0 = spammer):")
    width = max(len(a.name) for a in card.crowd.annotators) if card.crowd.annotators else 4
    for a in card.crowd.annotators:
        cells = "  ".join(f"{c} {a.sensitivity[c]:.2f}/{a.specificity[c]:.2f}/"
                          f"S={a.spammer_score[c]:.2f}" for c in a.sensitivity)
        mean_s = sum(a.spammer_score.values()) / max(len(a.spammer_score), 1)
        click.echo(f"  {a.name:<{width}}  {a.level:<5} {a.labelled:>10,} labelled  "
                   f"mean S {mean_s:.2f}  {cells}")


LOCAL_COMMANDS = (run_command, heatmap_command, models_group)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True)
@click.option("--steps", type=int, default=150, show_default=True, help="Training steps of the demo model.")
@click.option("--device", default="auto", show_default=True)
def demo_command(out_dir: Path, steps: int, device: str) -> None:
    """Fetch a real H&E slide, train a small stain U-Net, run it, write zarr + heatmap."""
    from workers.demo.run import run_demo

    training = tqdm(total=steps, desc="train", unit="step")

    def on_step(step: int, loss: float) -> None:
        training.update(1)
        training.set_postfix(loss=f"{loss:.3f}")

    bar = ProgressBar()
    with user_errors():
        try:
            out = run_demo(out_dir, steps=steps, progress=bar, device=device, on_step=on_step)
        finally:
            training.close()
            bar.close()
    dice = ", ".join(f"{k} {v:.2f}" for k, v in out.validation_dice.items())
    click.echo(f"slide:   {out.slide}\nmodel:   {out.model_card} (held-out Dice: {dice})")
    click.echo(f"result:  {out.result}\nheatmap: {out.heatmap}")


COMMANDS = (*LOCAL_COMMANDS, demo_command)
