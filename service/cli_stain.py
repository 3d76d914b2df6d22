"""``slidepipe train cyclegan``: train a stain-transforming CycleGAN between two domains.

Each domain (``--domain-a``, ``--domain-b``, repeatable) is slides and/or folders of
tile images from one centre. ``--out`` receives ``checkpoint.pt`` (``--resume``
continues it), ``metrics.jsonl`` (per epoch: losses, SSIM to the source and the
colour-histogram Wasserstein distance to the other domain on validation patches),
``training.json``, and one model folder per direction (``<name>-a2b``, ``<name>-b2a``:
card + weights), so ``--out`` works as a ``--model-dir`` for ``slidepipe run --stain``.
The work itself is ``workers.training.stain.train_stain_cyclegan``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from service.cli_engine import USER_ERRORS


@click.command("cyclegan")
@click.option("--domain-a", "domain_a", multiple=True, required=True, type=click.Path(exists=True, path_type=Path), help="Slide or folder of tiles of domain A (repeatable).")
@click.option("--domain-b", "domain_b", multiple=True, required=True, type=click.Path(exists=True, path_type=Path), help="Slide or folder of tiles of domain B (repeatable).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for checkpoint, metrics and the two model folders.")
@click.option("--name", default="cyclegan", show_default=True, help="Model name prefix: <name>-a2b and <name>-b2a.")
@click.option("--name-a", default="A", show_default=True, help="Domain A's name (recorded in the cards).")
@click.option("--name-b", default="B", show_default=True, help="Domain B's name.")
@click.option("--mpp", "target_mpp", type=float, default=0.5, show_default=True, help="Resolution of the training patches (and of the cards), µm/px.")
@click.option("--slide-mpp", type=float, help="Level-0 µm/px for slides that lack it.")
@click.option("--patch-size", "patch_px", type=int, default=256, show_default=True)
@click.option("--max-patches", type=int, default=1000, show_default=True, help="Patches kept per domain.")
@click.option("--min-tissue", type=float, default=0.75, show_default=True, help="Keep slide patches with at least this tissue fraction.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Share of each domain's patches held out for the metrics.")
@click.option("--depth", type=click.IntRange(1, 6), default=3, show_default=True, help="Generator depth (down-sampling levels).")
@click.option("--base-filters", type=int, default=32, show_default=True, help="Generator filters at full resolution (doubling per level).")
@click.option("--disc-filters", type=int, default=64, show_default=True, help="PatchGAN filters of its first layer.")
@click.option("--epochs", type=int, default=50, show_default=True)
@click.option("--steps-per-epoch", type=int, default=500, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--lambda-cycle", type=float, default=10.0, show_default=True)
@click.option("--lambda-identity", type=float, default=5.0, show_default=True, help="Identity-loss weight at epoch 0.")
@click.option("--identity-decay-epochs", type=float, default=20.0, show_default=True, help="Epochs over which the identity weight falls to 0.")
@click.option("--lr-decay-epochs", type=int, default=0, show_default=True, help="Linear learning-rate decay to 0 over the last N epochs.")
@click.option("--ema-decay", type=float, default=0.0, show_default=True, help="Export/validate a moving average of the generators (e.g. 0.995); 0: off.")
@click.option("--tile-size", "tile_px", type=int, default=2048, show_default=True, help="Whole-slide tile written into the cards.")
@click.option("--kept", "kept_px", type=int, default=1024, show_default=True, help="Central part of each tile kept.")
@click.option("--stride", "stride_px", type=int, default=512, show_default=True, help="Tile stride on the slide.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out with its settings (only --epochs and --device may change).")
@click.option("--overwrite", is_flag=True, help="Start again over an existing checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cyclegan(domain_a: tuple[Path, ...], domain_b: tuple[Path, ...], out_dir: Path,
                   name: str, name_a: str, name_b: str, target_mpp: float,
                   slide_mpp: float | None, patch_px: int, max_patches: int, min_tissue: float,
                   val_fraction: float, tile_px: int, kept_px: int, stride_px: int,
                   device: str, resume: bool, overwrite: bool, quiet: bool,
                   **hyper: Any) -> None:
    """Train a stain-transforming CycleGAN (de Bel et al.) from domain A to domain B."""
    from models.cyclegan_training import CycleGANConfig
    from models.predictor import resolve_device
    from workers.training.stain import CHECKPOINT, CardGeometry, train_stain_cyclegan
    from workers.training.stain_data import collect_domain

    checkpoint = out_dir / CHECKPOINT
    if checkpoint.exists() and not (resume or overwrite):
        raise click.ClickException(
            f"{checkpoint} exists: pass --resume to continue it or --overwrite to start again")
    if overwrite and not resume:
        checkpoint.unlink(missing_ok=True)
    try:
        with _errors():
            config = CycleGANConfig(patch_px=patch_px, seed=int(hyper.pop("seed")),
                                    device=str(resolve_device(device)), **hyper)
            config.validate()
            domains = [
                collect_domain(label, paths, patch_px=patch_px, target_mpp=target_mpp,
                               max_patches=max_patches, val_fraction=val_fraction,
                               min_tissue_fraction=min_tissue, slide_mpp=slide_mpp,
                               seed=config.seed)
                for label, paths in ((name_a, domain_a), (name_b, domain_b))
            ]
            for d in domains:
                click.echo(f"domain {d.name}: {len(d.train)} training / {len(d.val)} "
                           f"validation regions of {d.train.shape[1]} px at {target_mpp:g} "
                           f"µm/px ({patch_px} px patches cropped at random)")
            total = config.epochs * config.steps_per_epoch
            bar = tqdm(total=total, desc="train", unit="step", disable=quiet)

            def on_step(step: int, losses: dict[str, float]) -> None:
                bar.n = step
                bar.set_postfix(g=f"{losses['loss_g']:.3f}", d=f"{losses['loss_d']:.3f}",
                                refresh=False)
                bar.refresh()

            def on_epoch(record: dict[str, Any]) -> None:
                w = record.get("a2b_wasserstein")
                msg = f"epoch {record['epoch']}: loss_g {record.get('loss_g', 0):.3f}"
                if w is not None:
                    msg += (f", A->B colour distance {record['a2b_wasserstein_before']:.2f} -> "
                            f"{w:.2f}, SSIM {record['a2b_ssim']:.3f}")
                if not quiet:
                    bar.write(msg)

            try:
                trainer, cards = train_stain_cyclegan(
                    domains[0], domains[1], out_dir, config, name=name, target_mpp=target_mpp,
                    geometry=CardGeometry(tile_px=tile_px, kept_px=kept_px, stride_px=stride_px),
                    resume=resume, on_step=on_step, on_epoch=on_epoch)
            finally:
                bar.close()
    except KeyboardInterrupt:  # the checkpoint of the last finished epoch stays
        raise click.ClickException("interrupted; continue with --resume") from None
    click.echo(f"trained {trainer.epoch} epochs ({trainer.step} steps); checkpoint {checkpoint}")
    for direction, path in cards.items():
        click.echo(f"{direction}: {path}")


class _errors:
    """Expected failures as one-line messages (exit status 1, no traceback)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None and isinstance(exc, (*USER_ERRORS, ValueError)):
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
