"""docs/openapi.json describes exactly the routes the server registers.

The spec is written by hand; this keeps it honest. It builds the real
application and compares the router's (method, path template) pairs with
the spec's operations, the scope each handler demands with the operation's
``security``, the path parameters' names, and the error codes of
:mod:`blobd.errors` with the spec's ``Error`` schema. A failure names what
to add to or remove from the spec.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import hdrs, web

from blobd.config import Config
from blobd.errors import STATUS
from blobd.http.app import create_app

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
OPERATION_KEYS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PLACEHOLDER = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

Key = tuple[str, str]  # (METHOD, path template with placeholders as {})


def template(path: str) -> str:
    """``/blobs/{address}`` -> ``/blobs/{}``: parameter names are compared apart."""
    return _PLACEHOLDER.sub("{}", path)


def placeholders(path: str) -> list[str]:
    return _PLACEHOLDER.findall(path)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text(encoding="utf-8"))


@pytest.fixture
def app(config: Config) -> web.Application:
    return create_app(config)


def app_routes(app: web.Application) -> dict[Key, web.AbstractRoute]:
    """Every route but the catch-alls (method ``*``, e.g. ``/blobs/{tail:.*}``),
    which only turn what no route matched into 400/405."""
    return {(r.method, template(r.resource.canonical)): r for r in app.router.routes()
            if r.method != hdrs.METH_ANY}


def server_routes(app: web.Application) -> tuple[dict[Key, web.AbstractRoute], set[Key]]:
    """The routes that must be documented, and the HEAD routes that may be.

    A HEAD route registered beside a GET of the same path and handler is
    the automatic HEAD every GET has; the spec may describe it or leave it
    to the rule stated in its description.
    """
    routes = app_routes(app)
    optional = {key for key, route in routes.items()
                if key[0] == "HEAD" and routes.get(("GET", key[1])) is not None
                and routes[("GET", key[1])].handler is route.handler}
    return {k: r for k, r in routes.items() if k not in optional}, optional


def spec_operations(spec: dict[str, Any]) -> dict[Key, tuple[str, dict[str, Any]]]:
    operations = {}
    for path, item in spec["paths"].items():
        for method in OPERATION_KEYS:
            if method in item:
                operations[(method.upper(), template(path))] = (path, item[method])
    return operations


def route_diff(required: set[Key], optional: set[Key], documented: set[Key]) -> list[str]:
    """Human-readable differences; empty when the spec matches the server."""
    problems = [f"undocumented: {m} {p} is served but not in docs/openapi.json"
                for m, p in sorted(required - documented)]
    problems += [f"stale: {m} {p} is in docs/openapi.json but the server has no such route"
                 for m, p in sorted(documented - required - optional)]
    return problems


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow local ``$ref``s (``#/components/parameters/address``)."""
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references are supported: {ref}"
        node = spec
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_spec_documents_every_route_and_nothing_else(app, spec) -> None:
    required, optional = server_routes(app)
    problems = route_diff(set(required), optional, set(spec_operations(spec)))
    assert not problems, "docs/openapi.json is out of step with the router:\n  " + \
        "\n  ".join(problems)


def test_the_comparison_sees_missing_and_invented_routes(app) -> None:
    # Guards the normalisation: a bug that made every template equal would
    # let any spec pass the test above.
    required, optional = server_routes(app)
    documented = set(required)
    assert route_diff(set(required), optional, documented) == []
    assert ("PUT", "/blobs/{}") in required and ("PATCH", "/tus/{}") in required
    assert ("HEAD", "/blobs/{}") in optional and ("HEAD", "/tus/{}") in required
    pruned = documented - {("PUT", "/refs/{}")}
    assert route_diff(set(required), optional, pruned) == [
        "undocumented: PUT /refs/{} is served but not in docs/openapi.json"]
    invented = documented | {("GET", "/refs/{}/history")}
    assert route_diff(set(required), optional, invented) == [
        "stale: GET /refs/{}/history is in docs/openapi.json but the server has no such route"]


def test_path_parameters_are_named_as_in_the_router(app, spec) -> None:
    routes = app_routes(app)
    problems = []
    for key, (path, operation) in sorted(spec_operations(spec).items()):
        route = routes.get(key)
        if route is None:
            continue  # reported by the route test
        served = placeholders(route.resource.canonical)
        if placeholders(path) != served:
            problems.append(f"{key[0]} {path}: the router names its parameters {served}")
        item = spec["paths"][path]
        declared = {p["name"] for p in (resolve(spec, raw) for raw in
                                        item.get("parameters", []) + operation.get("parameters", []))
                    if p["in"] == "path"}
        if declared != set(served):
            problems.append(f"{key[0]} {path}: path parameters declared {sorted(declared)},"
                            f" expected {sorted(served)}")
    assert not problems, "\n".join(problems)


def test_security_matches_each_handlers_scope(app, spec) -> None:
    routes = app_routes(app)
    problems = []
    for key, (path, operation) in sorted(spec_operations(spec).items()):
        route = routes.get(key)
        if route is None:
            continue
        handler = route.handler
        scope = getattr(handler, "blobd_scope", None)
        anonymous = getattr(handler, "blobd_anonymous_flag", None)
        security = operation.get("security", spec.get("security", []))
        documented = [s for requirement in security for s in requirement.get("bearerAuth", [])]
        if documented != ([scope] if scope else []):
            problems.append(f"{key[0]} {path}: handler needs scope {scope!r},"
                            f" security says {documented}")
        if operation.get("x-blobd-anonymous") != anonymous:
            problems.append(f"{key[0]} {path}: handler's anonymous setting is {anonymous!r},"
                            f" x-blobd-anonymous says {operation.get('x-blobd-anonymous')!r}")
    assert not problems, "\n".join(problems)


def test_error_schema_lists_every_error_code(spec) -> None:
    documented = spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    missing = sorted(set(STATUS) - set(documented))
    stale = sorted(set(documented) - set(STATUS))
    assert not missing, f"error codes missing from the Error schema's enum: {missing}"
    assert not stale, f"the Error schema lists codes blobd.errors does not have: {stale}"


def test_every_operation_has_an_id_and_responses(spec) -> None:
    ids = [op.get("operationId") for _, op in spec_operations(spec).values()]
    assert None not in ids
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    assert all(op.get("responses") for _, op in spec_operations(spec).values())


def test_every_get_declares_its_head(spec) -> None:
    """Found by review: api.md (and this spec's description) say every GET
    route answers HEAD, but only /blobs/{address} declared it."""
    missing = [path for path, item in spec["paths"].items()
               if "get" in item and "head" not in item]
    assert not missing, f"GET without a head operation: {missing}"
    for path, item in spec["paths"].items():
        if "get" in item:
            assert item["head"].get("security") == item["get"].get("security"), path
            assert set(item["head"]["responses"]) == set(item["get"]["responses"]), path


def test_blob_bodies_declare_the_417_of_a_bad_expect(spec) -> None:
    """Any route answers an Expect other than 100-continue with 417; those
    that take a blob's bytes, where clients send Expect, declare it."""
    undeclared = [f"{method} {path}" for (method, _), (path, operation)
                  in spec_operations(spec).items()
                  if "requestBody" in operation
                  and "application/json" not in operation["requestBody"]["content"]
                  and "417" not in operation["responses"]]
    assert not undeclared, f"no 417 declared: {undeclared}"


def test_the_tus_method_override_declares_what_it_stands_for(spec) -> None:
    """Found by review: POST /tus/{id} with X-HTTP-Method-Override answers
    as the PATCH, DELETE or HEAD it stands for, but declared only a few of
    their statuses."""
    item = spec["paths"]["/tus/{id}"]
    overridden = {code for method in ("patch", "delete", "head")
                  for code in item[method]["responses"]}
    missing = sorted(overridden - set(item["post"]["responses"]))
    assert not missing, f"POST /tus/{{id}} lacks {missing}"


@pytest.mark.parametrize("method, path, status", [
    ("delete", "/uploads/{id}", "409"),   # while its completion runs
    ("delete", "/tus/{id}", "423"),       # while it is being committed
    ("head", "/tus/{id}", "423"),         # the commit a HEAD may run
    ("head", "/tus/{id}", "507"),
])
def test_busy_and_commit_statuses_are_declared(spec, method, path, status) -> None:
    assert status in spec["paths"][path][method]["responses"]
