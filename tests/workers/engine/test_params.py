"""The run parameters are declared once (``workers.engine.params``); every door agrees.

For each declared parameter: the REST model's JSON schema, the ``slidepipe run`` option,
``RunSpec``'s default and the engine's check say what the declaration says. A limit changed
in one place only fails here.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click
import pytest
from pydantic import ValidationError

from service.cli_engine import run_command
from workers.engine.params import (
    API_PARAMS,
    ENGINE_PARAMS,
    MAX_TILE_PX,
    PARAMS,
    PARAMS_BY_NAME,
    PLUMBING_FIELDS,
    TISSUE_FIELDS,
    Param,
    check_value,
)
from workers.engine.spec import PATH_FIELDS, RunSpec
from workers.jobs.params import JobParams
from wsi.errors import InvalidParameter

BOUNDED = [p for p in PARAMS if p.bounded]
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}
#: ``slidepipe run``'s own arguments and options, not run parameters.
RUN_COMMAND_OWN = {"slide", "model", "out_path", "quiet", "export_tiff"}


def _spec(**values: Any) -> RunSpec:
    """A spec with the given values; construction runs the engine's check, no I/O."""
    return RunSpec(slide_path=Path("s.svs"), model="identity", out_path=Path("r.zarr"), **values)


def _step(param: Param, value: float, direction: int) -> float:
    """The next representable value of the parameter's type above (+1) or below (-1)."""
    if param.type is int:
        return value + direction
    return math.nextafter(value, math.inf if direction > 0 else -math.inf)


def _outside(param: Param) -> list[float]:
    """Values just beyond each declared limit."""
    values = []
    if param.ge is not None:
        values.append(_step(param, param.ge, -1))
    if param.gt is not None:
        values.append(param.gt)
    if param.le is not None:
        values.append(_step(param, param.le, 1))
    if param.lt is not None:
        values.append(param.lt)
    return values


def _inside(param: Param) -> list[float]:
    """Each inclusive limit itself, and the value next to each exclusive one."""
    values = [b for b in (param.ge, param.le) if b is not None]
    if param.gt is not None:
        values.append(_step(param, param.gt, 1))
    if param.lt is not None:
        values.append(_step(param, param.lt, -1))
    return [param.type(v) for v in values]


# -- the declaration itself ----------------------------------------------------------------
def test_declaration_is_consistent() -> None:
    assert len(PARAMS_BY_NAME) == len(PARAMS), "a parameter is declared twice"
    for p in PARAMS:
        assert p.type in (int, float, str, bool, Path), p.name
        assert p.help.strip(), p.name
        assert p.engine or (p.api and p.maps_to in PARAMS_BY_NAME), p.name
        check_value(p, p.default)  # a default within its own limits and choices
    # server-side values never reach the API: paths, device, threads, compile, overwrite
    assert not any(p.api for p in PARAMS if p.type is Path)
    assert {p.name for p in PARAMS if not p.api} >= {
        "weights", "model_dir", "stain_reference", "device", "compile", "overwrite"}


def test_declaration_matches_the_slide_library() -> None:
    """wsi keeps its own guards; the declaration must not allow what they refuse."""
    from workers.engine.result_layout import STORE_TYPES
    from wsi.backends import BACKENDS
    from wsi.blending import WINDOWS
    from wsi.tiling import MAX_TILE_PX as WSI_MAX_TILE_PX
    from wsi.tissue import TISSUE_METHODS, TissueParams

    assert MAX_TILE_PX == WSI_MAX_TILE_PX
    assert PARAMS_BY_NAME["tissue_method"].choices == TISSUE_METHODS
    assert PARAMS_BY_NAME["window"].choices == WINDOWS
    assert PARAMS_BY_NAME["probability_dtype"].choices == tuple(STORE_TYPES)
    assert PARAMS_BY_NAME["backend"].choices == ("auto", *BACKENDS)
    for mpp in _inside(PARAMS_BY_NAME["tissue_working_mpp"]):
        TissueParams(working_mpp=mpp).validate()
    # the run's tissue parameters are TissueParams' fields, with the same defaults
    assert set(TISSUE_FIELDS.values()) == {f.name for f in fields(TissueParams)} - {
        "min_threshold"}
    for run_name, field_name in TISSUE_FIELDS.items():
        param = PARAMS_BY_NAME[run_name]
        assert getattr(TissueParams(), field_name) == param.default, run_name
        for value in _inside(param) if param.bounded else [param.default]:
            TissueParams(**{field_name: value}).validate()
    assert _spec(min_fragment_um2=50.0, pen_filter=False).tissue_values() == {
        **{f: getattr(TissueParams(), f) for f in TISSUE_FIELDS.values()},
        "min_fragment_um2": 50.0, "pen_filter": False}


def test_params_modules_import_neither_torch_nor_the_slide_stack() -> None:
    code = ("import sys, workers.engine.params, workers.jobs.params\n"
            "print(sorted(m for m in ('torch', 'cv2', 'openslide', 'tiffslide', 'click')"
            " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# -- REST: JobParams -------------------------------------------------------------------------
def _schema_of(name: str) -> dict[str, Any]:
    prop = dict(JobParams.model_json_schema()["properties"][name])
    if "anyOf" in prop:  # an optional value: {the type} | null
        kinds = prop.pop("anyOf")
        assert {"type": "null"} in kinds, name
        (inner,) = [k for k in kinds if k != {"type": "null"}]
        prop.update(inner)
    return prop


def test_job_params_fields_are_the_api_params() -> None:
    assert list(JobParams.model_fields) == [p.name for p in API_PARAMS]


@pytest.mark.parametrize("param", API_PARAMS, ids=lambda p: p.name)
def test_job_params_schema_matches_declaration(param: Param) -> None:
    prop = _schema_of(param.name)
    assert prop["type"] == JSON_TYPES[param.type]
    assert prop.get("default") == param.default
    assert prop.get("minimum") == param.ge
    assert prop.get("exclusiveMinimum") == param.gt
    assert prop.get("maximum") == param.le
    assert prop.get("exclusiveMaximum") == param.lt
    assert prop.get("enum") == (list(param.choices) if param.choices else None)
    assert prop.get("minLength") == param.min_length
    assert prop.get("maxLength") == param.api_max_length
    assert prop["description"] == param.describe()


@pytest.mark.parametrize("param", [p for p in BOUNDED if p.api], ids=lambda p: p.name)
def test_job_params_limits(param: Param) -> None:
    for value in _inside(param):
        assert getattr(JobParams(**{param.name: value}), param.name) == value
    for value in _outside(param):
        with pytest.raises(ValidationError, match=param.name):
            JobParams(**{param.name: value})


def test_job_params_cross_checks() -> None:
    JobParams(tile_px=64, overlap_px=63)
    with pytest.raises(ValidationError, match=r"overlap_px \(64\) must be smaller"):
        JobParams(tile_px=64, overlap_px=64)
    with pytest.raises(ValidationError, match="out_path"):
        JobParams(out_path="/etc")
    assert JobParams(tissue_method="none").tissue_method == "none"


def test_job_params_make_a_run_spec() -> None:
    """What the API stores is what the worker's RunSpec accepts (build_spec's path)."""
    stored = JobParams(**{p.name: _inside(p)[-1] for p in BOUNDED if p.api and
                          p.name != "overlap_px"}).model_dump()
    values = {k: v for k, v in stored.items() if v is not None}
    for p in API_PARAMS:
        if not p.engine:
            values.pop(p.name, None)
    spec = RunSpec.from_dict({**values, "slide_path": "s.svs", "model": "identity",
                              "out_path": "r.zarr"})
    assert spec.batch_size == PARAMS_BY_NAME["batch_size"].le


# -- CLI: slidepipe run ----------------------------------------------------------------------
def _options() -> dict[str, click.Parameter]:
    return {p.name: p for p in run_command.params if p.name is not None}


def test_run_options_are_the_engine_params() -> None:
    names = set(_options()) - RUN_COMMAND_OWN
    assert names == {p.name for p in ENGINE_PARAMS}


@pytest.mark.parametrize("param", ENGINE_PARAMS, ids=lambda p: p.name)
def test_run_option_matches_declaration(param: Param) -> None:
    option = _options()[param.name]
    assert isinstance(option, click.Option)
    assert option.opts == [param.flag, *param.aliases]
    assert option.default == param.default
    kind = option.type
    if param.type is bool:
        assert option.is_flag
    elif param.type is Path:
        assert isinstance(kind, click.Path) and kind.exists == param.must_exist
    elif param.choices:
        assert isinstance(kind, click.Choice) and tuple(kind.choices) == param.choices
    elif param.type in (int, float):
        expected = click.IntRange if param.type is int else click.FloatRange
        assert isinstance(kind, expected)
        assert kind.min == (param.ge if param.ge is not None else param.gt)
        assert kind.max == (param.le if param.le is not None else param.lt)
        assert kind.min_open == (param.gt is not None)
        assert kind.max_open == (param.lt is not None)
    else:
        assert kind is click.STRING
    if param.unit:
        assert f"Unit: {param.unit}." in (option.help or "")


def _parse(*args: str) -> dict[str, Any]:
    ctx = run_command.make_context("run", ["s.svs", "--model", "m", "--out", "r.zarr", *args])
    return ctx.params


def test_run_option_spellings() -> None:
    new = _parse("--tile-px", "128", "--overlap-px", "32", "--min-tissue-fraction", "0.25")
    old = _parse("--tile-size", "128", "--overlap", "32", "--min-tissue", "0.25")
    for params in (new, old):
        assert (params["tile_px"], params["overlap_px"]) == (128, 32)
        assert params["min_tissue_fraction"] == 0.25
    assert _parse("--tissue-method", "none", "--chunk-px", "64")["chunk_px"] == 64
    # flags that are on by default can be turned off
    assert _parse()["pen_filter"] is True and _parse()["cover_all_tissue"] is True
    assert _parse("--no-pen-filter", "--no-cover-all-tissue")["pen_filter"] is False
    assert _parse("--no-cover-all-tissue")["cover_all_tissue"] is False
    with pytest.raises(click.BadParameter, match="1024"):
        _parse("--batch-size", "1025")


# -- engine: RunSpec -------------------------------------------------------------------------
def test_run_spec_fields_are_declared() -> None:
    names = {f.name for f in fields(RunSpec)}
    assert names == {p.name for p in ENGINE_PARAMS} | set(PLUMBING_FIELDS)
    assert set(PATH_FIELDS) == {"slide_path", "out_path"} | {
        p.name for p in ENGINE_PARAMS if p.type is Path}


@pytest.mark.parametrize("param", ENGINE_PARAMS, ids=lambda p: p.name)
def test_run_spec_default_matches_declaration(param: Param) -> None:
    (field,) = [f for f in fields(RunSpec) if f.name == param.name]
    assert field.default is not MISSING and field.default == param.default
    assert getattr(_spec(), param.name) == param.default


@pytest.mark.parametrize("param", [p for p in BOUNDED if p.engine], ids=lambda p: p.name)
def test_engine_check_limits(param: Param) -> None:
    for value in _inside(param):
        assert getattr(_spec(**{param.name: value}), param.name) == value
    for value in _outside(param):
        with pytest.raises(InvalidParameter, match=rf"{param.name} must be in .*got {value}"):
            _spec(**{param.name: value})
    with pytest.raises(InvalidParameter, match=param.name):
        _spec(**{param.name: math.nan if param.type is float else "8"})


@pytest.mark.parametrize("param", [p for p in ENGINE_PARAMS if p.choices], ids=lambda p: p.name)
def test_engine_check_choices(param: Param) -> None:
    for choice in param.choices or ():
        _spec(**{param.name: choice})
    with pytest.raises(InvalidParameter, match=f"{param.name} must be one of"):
        _spec(**{param.name: "bogus"})


def test_engine_check_types_patterns_and_cross_fields() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        _spec(device=device)
    with pytest.raises(InvalidParameter, match="device must match"):
        _spec(device="gpu0")
    with pytest.raises(InvalidParameter, match="batch_size must be int"):
        _spec(batch_size=True)
    with pytest.raises(InvalidParameter, match="tta must be bool"):
        _spec(tta=1)
    with pytest.raises(InvalidParameter, match="chunk_px must be set"):
        _spec(chunk_px=None)
    with pytest.raises(InvalidParameter, match="stain must have at least"):
        _spec(stain="")
    with pytest.raises(InvalidParameter, match="overlap_px"):
        _spec(tile_px=64, overlap_px=64)
    with pytest.raises(InvalidParameter, match="stain_output"):
        _spec(stain_output=True)
    _spec(stain="macenko", stain_output=True, tile_px=64, overlap_px=63)
    assert _spec(target_mpp=1).target_mpp == 1  # an int is a fine float
