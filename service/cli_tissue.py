"""``slidepipe tissue``: the tissue mask a run would use, drawn over the thumbnail.

What a lab engineer looks at before a batch: ``slidepipe tissue SLIDE --out mask.png``
takes the same tissue options as ``slidepipe run`` (from ``workers.engine.params``) and
prints what was found; a slide without tissue says so (exit status 0: the picture is
still written, it shows the empty mask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from service.cli_engine import param_option, user_errors
from workers.engine.params import PARAMS_BY_NAME, TISSUE_FIELDS


def tissue_options(f: Any) -> Any:
    """The run's tissue parameters (and --slide-mpp, --backend) as options."""
    for name in reversed(("slide_mpp", "backend", *TISSUE_FIELDS)):
        f = param_option(PARAMS_BY_NAME[name])(f)
    return f


@click.command("tissue")
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write: the thumbnail with the tissue outlined.")
@click.option("--max-size", "max_px", type=click.IntRange(16, 8192), default=1024,
              show_default=True, help="Longer side of the picture in pixels.")
@tissue_options
def tissue_command(slide: Path, out_path: Path, max_px: int, slide_mpp: float | None,
                   backend: str, **options: Any) -> None:
    """Find SLIDE's tissue as `slidepipe run` would and draw it over the thumbnail.

    SLIDE is a slide file, or the folder of a DICOM or MRXS slide."""
    from wsi.reader import Slide
    from wsi.tissue import TissueParams
    from wsi.tissue_overlay import encode_png, tissue_picture

    params = TissueParams(**{TISSUE_FIELDS[k]: v for k, v in options.items()})
    with user_errors():
        with Slide(slide, backend=backend, slide_mpp=slide_mpp) as opened:
            picture, mask = tissue_picture(opened, params, max_px)
            name = opened.path.name
        out_path.write_bytes(encode_png(picture))
    click.echo(f"{name}: {params.method} at {mask.mpp:.3g} µm/px, {mask.describe()}")
    if mask.area_um2 == 0:
        click.secho(f"warning: no tissue on {name!r}; a run would analyse nothing",
                    err=True, fg="yellow")
    click.echo(f"wrote {out_path}")


COMMANDS = (tissue_command,)
