"""CLI commands for what a pathologist takes away from a result: ``export geojson``,
``summary`` and ``view`` (the browser viewer, served locally)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from service.cli_engine import user_errors

log = logging.getLogger(__name__)

RESULT = click.Path(exists=True, file_okay=False, path_type=Path)


@click.group("export")
def export_group() -> None:
    """Export a result for other software (QuPath, slide viewers)."""


@export_group.command("geojson")
@click.argument("result", type=RESULT)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="GeoJSON file to write.")
@click.option("--classes", help="Comma-separated classes to export (default: all).")
@click.option("--simplify-um", type=click.FloatRange(min=0), default=None,
              help="Outline tolerance in µm (default: half a result pixel; 0: every corner).")
@click.option("--min-area-um2", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Leave out smaller regions.")
@click.option("--no-tissue", is_flag=True, help="Leave out the tissue outline.")
def export_geojson_command(result: Path, out_path: Path, classes: str | None,
                           simplify_um: float | None, min_area_um2: float,
                           no_tissue: bool) -> None:
    """Write RESULT's class regions as QuPath GeoJSON (File > Import objects in QuPath)."""
    from wsi.geojson_export import export_geojson

    wanted = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    started = time.perf_counter()
    with user_errors():
        try:
            count = export_geojson(result, out_path, classes=wanted, simplify_um=simplify_um,
                                   min_area_um2=min_area_um2, tissue=not no_tissue)
        except KeyError as err:
            raise click.ClickException(str(err.args[0])) from err
    click.echo(f"wrote {out_path} ({count} features) in {time.perf_counter() - started:.1f}s")


@export_group.command("tiff")
@click.argument("result", type=RESULT)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--flavor", type=click.Choice(["svs", "generic"]), default="svs", show_default=True)
def export_tiff_command(result: Path, out_path: Path, flavor: str) -> None:
    """Write RESULT's RGB image (a stain transfer) as a pyramidal TIFF/SVS."""
    from wsi.tiff_export import export_rgb_tiff

    with user_errors():
        info = export_rgb_tiff(result, out_path, flavor=flavor)
    width, height = info.dimensions
    click.echo(f"wrote {info.path} ({width} x {height} px, {info.mpp:g} µm/px, "
               f"{len(info.downsamples)} levels)")


@click.command("summary")
@click.argument("result", type=RESULT)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def summary_command(result: Path, as_json: bool) -> None:
    """The slide report of RESULT: tissue and analysed area, per-class area, share and
    mean probability, and a joint model's slide-level scores."""
    from wsi.summary import summarize

    with user_errors():
        report = summarize(result)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"slide {report['slide']}, model {report['model']}, {report['finished']}")
    for warning in report["warnings"]:
        click.echo(f"WARNING: {warning}")
    click.echo(f"tissue   {_mm2(report['tissue_area_mm2'])}")
    click.echo(f"analysed {_mm2(report['analysed_area_mm2'])}")
    click.echo(f"{'class':<16} {'area mm2':>10} {'of tissue':>10} {'mean P':>8}")
    for cls in report["classes"]:
        share = cls["share_of_tissue"]
        mean = cls["mean_probability"]
        click.echo(f"{cls['name']:<16} {cls['area_mm2']:>10.4f} "
                   f"{'' if share is None else f'{share:.1%}':>10} "
                   f"{'' if mean is None else f'{mean:.3f}':>8}")
    scores = report.get("slide_scores")
    if scores:
        click.echo(f"slide scores ({scores['aggregation']}, {scores['tiles']} tiles): " + ", ".join(
            f"{k} {v:.3f}" for k, v in scores["scores"].items() if v is not None))


def _mm2(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f} mm2"


@click.command("view")
@click.argument("result", type=RESULT)
@click.option("--slide", "slide_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The slide the result was made from.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8765, show_default=True)
def view_command(result: Path, slide_path: Path, host: str, port: int) -> None:
    """Serve the browser viewer for a local RESULT over SLIDE (Ctrl-C stops it)."""
    import uvicorn

    from service.view_local import local_viewer_app

    app = local_viewer_app(result, slide_path)
    click.echo(f"viewer: http://{host}:{port}/v1/view/local/")
    uvicorn.run(app, host=host, port=port, log_level="warning")


COMMANDS = (export_group, summary_command, view_command)
