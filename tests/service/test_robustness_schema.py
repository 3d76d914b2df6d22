"""The OpenAPI contract, fuzzed against the real API (uvicorn over HTTP) with schemathesis.

Every operation of ``/openapi.json`` gets a bounded number of generated requests, valid
and invalid ones; each answer must be no server error and must conform to the document
(status code, content type, headers and body schema, invalid data refused). Half of the
valid job submissions name a real slide, so the jobs layer's checks are reached too; the
jobs they queue stay queued (this stack has no worker), and no job id is handed to the
fuzzer, whose event streams would then wait for the end of a job that never runs.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.conftest import KEYS, make_stack, next_redis_url

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.slow

#: Generated requests per operation (and phase); about 20 operations.
MAX_EXAMPLES = 8
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
AUTH = {"Authorization": f"Bearer {KEYS['alice']}"}


@pytest.fixture(scope="module")
def contract_stack(
    tmp_path_factory: pytest.TempPathFactory, redis_base_url: str, svc_slides: dict
) -> Iterator[Stack]:
    s = make_stack(tmp_path_factory.mktemp("contract"), next_redis_url(redis_base_url))
    try:
        s.start_api()
        with s.client("alice") as alice:
            s.upload(alice, svc_slides["cmu"])
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def real_slide_id(contract_stack: Stack) -> str:
    with contract_stack.client("alice") as alice:
        return str(alice.get("/v1/slides").json()["items"][0]["id"])


@pytest.fixture(scope="module")
def api_schema(contract_stack: Stack) -> Any:
    config = SchemathesisConfig.from_dict(
        {
            "headers": AUTH,
            "request-timeout": 30,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            "phases": {
                "examples": {"enabled": True},
                "fuzzing": {"enabled": True},
                "coverage": {"enabled": False},  # hundreds of boundary cases per operation
                "stateful": {"enabled": False},  # the document declares no links
            },
        }
    )
    return schemathesis.openapi.from_url(f"{contract_stack.base_url}/openapi.json", config=config)


def _seed_real_slide(case: Any, slide_id: str) -> None:
    """Name the real slide in half of the valid job submissions, and a real model in
    three quarters (by a hash of the body), so that their parameters are judged."""
    body = case.body
    if not isinstance(body, dict):
        return
    digest = hashlib.sha256(repr(body).encode()).digest()[0]
    if isinstance(body.get("model"), str) and digest % 4:
        body["model"] = "identity"
    if isinstance(body.get("slide_id"), str) and digest % 2 == 0:
        body["slide_id"] = slide_id
    ids = body.get("slide_ids")
    if isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids) and digest % 2:
        body["slide_ids"] = [slide_id]


def _run_operation(operation: Any, mode: GenerationMode, slide_id: str, calls: Counter) -> None:
    """``MAX_EXAMPLES`` generated requests of one operation, each validated."""
    try:
        strategy = operation.as_strategy(generation_mode=mode)
    except Exception as err:  # e.g. nothing to make invalid in a parameterless operation
        calls[f"not generated: {type(err).__name__}"] += 1
        return

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        if mode == GenerationMode.POSITIVE:
            _seed_real_slide(case, slide_id)
        response = case.call_and_validate(headers=AUTH, checks=CHECKS)
        calls[response.status_code] += 1

    run()


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, BaseExceptionGroup):
        text += "".join(f"\n  - {_describe(sub)}" for sub in err.exceptions)
    return text


def test_api_contract_no_server_errors(api_schema: Any, real_slide_id: str) -> None:
    """Every operation, valid and invalid requests: no 5xx, and every answer conforms.

    Driven through schemathesis' strategies rather than its pytest plugin (whose fixture
    loader does not run under pytest 9)."""
    failures: dict[str, str] = {}
    calls: Counter = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 17, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _run_operation(operation, mode, real_slide_id, calls)
            except Unsatisfiable:  # e.g. no invalid request to make of GET /healthz
                calls[f"unsatisfiable {mode.value} {operation.label}"] += 1
            except (Exception, BaseExceptionGroup) as err:  # failed checks: report them all
                failures[f"{mode.value} {operation.label}"] = _describe(err)
    statuses = {k: v for k, v in calls.items() if isinstance(k, int)}
    assert not [code for code in statuses if code >= 500], statuses
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    # the fuzz reached real work: uploads refused, submissions judged, ids looked up
    assert sum(statuses.values()) >= 10 * len(operations), calls
    assert {400, 401, 404, 422} <= set(statuses) or {404, 422} <= set(statuses), calls


def test_contract_document_lists_every_error(contract_stack: Stack) -> None:
    """What the fuzz relies on: each /v1 operation documents 401/422/503/507 as Error."""
    with contract_stack.client(None) as anonymous:
        document = anonymous.get("/openapi.json").json()
    operations = [
        (path, method, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if path.startswith("/v1/")
    ]
    assert len(operations) >= 15
    for path, method, op in operations:
        for code in ("401", "422", "503", "507"):
            content = op["responses"][code]["content"]["application/json"]["schema"]
            assert content == {"$ref": "#/components/schemas/Error"}, (path, method, code)
    assert "HTTPValidationError" not in document["components"]["schemas"]
