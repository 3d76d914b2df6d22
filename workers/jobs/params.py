"""``JobParams``: what a REST client may set for a run, generated from the engine's table.

Each field, its type, default, limits, choices and description come from
:data:`workers.engine.params.API_PARAMS`, so the API and the engine cannot disagree on a
range (``tests/workers/engine/test_params.py`` checks the generated JSON schema). Out-of-
range values answer 422 before anything is stored or queued. Torch-free: the API imports it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from workers.engine.params import API_PARAMS, Param, check_tile_overlap


class _JobParamsBase(BaseModel):
    """Unknown fields (``out_path``, ``device``...) are errors, not silently dropped."""

    #: NaN and infinities (JSON ``NaN``, ``Infinity``, ``1e400``) are refused as such,
    #: with "should be a finite number", rather than failing a range check by accident.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> _JobParamsBase:
        # InvalidParameter is a ValueError: pydantic reports it as a 422 on the model
        check_tile_overlap(getattr(self, "tile_px", None), getattr(self, "overlap_px", None))
        return self


def _annotation(param: Param) -> Any:
    kind: Any = Literal[param.choices] if param.choices else param.type
    return kind | None if param.optional else kind


def _field(param: Param) -> Any:
    """A pydantic ``Field`` with the declared bounds; length bounds apply to text only."""
    return Field(
        default=param.default,
        ge=param.ge, gt=param.gt, le=param.le, lt=param.lt,
        min_length=param.min_length, max_length=param.api_max_length,
        description=param.describe(),
    )


# pydantic's overloads cannot see field definitions passed as **dict, hence the ignore
JobParams = create_model(  # type: ignore[call-overload]
    "JobParams",
    __base__=_JobParamsBase,
    __module__=__name__,
    __doc__="What a client may set for a run; ``None`` takes the model card's value.\n\n"
    "Paths, device, threads, compilation and overwriting are the server's business and "
    "cannot be set.",
    **{p.name: (_annotation(p), _field(p)) for p in API_PARAMS},
)
