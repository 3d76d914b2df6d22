"""``GET /v1/slides/{id}/tissue.png``: the tissue mask a run would use, over the thumbnail.

The same picture as ``slidepipe tissue``, for an uploaded slide: what to look at before a
batch. The tissue parameters a job takes can be tried here (their limits come from
``workers.engine.params``); the picture is cached per slide, size and parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Response

from service.deps import OwnerDep, SettingsDep, StoreDep
from workers.engine.params import PARAMS_BY_NAME, TISSUE_FIELDS
from workers.jobs import actions as jobs
from workers.jobs.objects import slide_path
from workers.jobs.rows import SlideRow
from workers.jobs.settings import Settings
from wsi.reader import Slide
from wsi.tissue import TissueParams
from wsi.tissue_overlay import encode_png, tissue_picture

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/slides", tags=["slides"])

_METHOD = PARAMS_BY_NAME["tissue_method"]
_MPP = PARAMS_BY_NAME["tissue_working_mpp"]
_FRAGMENT = PARAMS_BY_NAME["min_fragment_um2"]


def _picture(settings: Settings, slide: SlideRow, max_size: int, params: TissueParams
             ) -> tuple[bytes, dict[str, str]]:
    """The PNG and its summary headers, rendered once per slide, size and parameters."""
    key = hashlib.sha256(json.dumps([max_size, vars(params)], sort_keys=True).encode())
    cache = settings.cache_dir / "tissue" / f"{slide.id}-{key.hexdigest()[:16]}"
    png_path, meta_path = cache.with_suffix(".png"), cache.with_suffix(".json")
    if png_path.is_file() and meta_path.is_file():
        return png_path.read_bytes(), json.loads(meta_path.read_text())
    with slide_path(settings, slide) as path, Slide(path) as reader:
        picture, mask = tissue_picture(reader, params, max_size)
    png = encode_png(picture)
    headers = {"X-Tissue-Area-Um2": f"{mask.area_um2:.0f}",
               "X-Tissue-Fragments": str(mask.fragments),
               "X-Tissue-Method": params.method, "X-Tissue-Mpp": f"{mask.mpp:.4g}"}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        for path, data in ((png_path, png), (meta_path, json.dumps(headers).encode())):
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    except OSError as err:  # a full disk costs the cache, not the answer
        log.warning("tissue picture cache %s not written: %s", cache.name, err)
    return png, headers


@router.get(
    "/{slide_id}/tissue.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}},
                     "description": "the thumbnail with the tissue outlined; headers "
                     "X-Tissue-Area-Um2 and X-Tissue-Fragments say what was found"},
               422: {"description": "the slide declares no µm/px"}},
)
async def get_tissue_picture(
    slide_id: str,
    owner: OwnerDep,
    store: StoreDep,
    settings: SettingsDep,
    max_size: Annotated[int, Query(ge=16, le=2048, description="longer side in pixels")] = 1024,
    tissue_method: Annotated[str, Query(pattern="^(" + "|".join(_METHOD.choices or ()) + ")$",
                                        description=_METHOD.describe())] = _METHOD.default,
    tissue_working_mpp: Annotated[float, Query(ge=_MPP.ge, le=_MPP.le,
                                               description=_MPP.describe())] = _MPP.default,
    min_fragment_um2: Annotated[float, Query(ge=_FRAGMENT.ge, le=_FRAGMENT.le,
                                             description=_FRAGMENT.describe())
                                ] = _FRAGMENT.default,
    pen_filter: Annotated[bool, Query(description=PARAMS_BY_NAME["pen_filter"].describe())
                          ] = PARAMS_BY_NAME["pen_filter"].default,
) -> Response:
    """The slide's thumbnail with the tissue a run would analyse outlined, and a caption
    saying the method and what it found (or that there is no tissue)."""
    slide = await anyio.to_thread.run_sync(jobs.get_slide, store, owner, slide_id)
    values: dict[str, Any] = {
        "tissue_method": tissue_method, "tissue_working_mpp": tissue_working_mpp,
        "min_fragment_um2": min_fragment_um2, "pen_filter": pen_filter}
    params = TissueParams(**{TISSUE_FIELDS[k]: v for k, v in values.items()})
    png, headers = await anyio.to_thread.run_sync(_picture, settings, slide, max_size, params)
    return Response(png, media_type="image/png", headers=headers)
