"""Hypothesis strategies for requests to an app, drawn from its OpenAPI schema.

``operations(schema)`` lists the operations; ``requests_for(op, schema)``
draws requests for one: path, query and header parameters and a JSON body
generated from their JSON Schemas (``$ref``, objects, arrays, strings with
lengths, enums and patterns, bounded numbers, ``anyOf``/``oneOf``), and, with
some probability, values that break the schema (wrong types, arbitrary text,
arbitrary bytes as the body) so validation paths are exercised too.

Knobs that only make the demo slow (``delay``, ``seconds``, ``size``,
``processing_seconds``) are pinned to small values: the fuzz looks for 5xx
answers, not for a way to make the run take minutes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

__all__ = ["FuzzRequest", "Operation", "header_safe", "operations", "requests_for"]

PINNED_QUERY = {"delay": "0", "seconds": "0", "size": "100", "heartbeat": "1"}
PINNED_BODY = {"processing_seconds": 0, "sleep": 0}
SKIPPED_PREFIXES = ("/sse/", "/ws/")  # endless streams: not request/response operations

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    parameters: tuple[dict[str, Any], ...]
    body: dict[str, Any] | None

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.path}"


@dataclass
class FuzzRequest:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None

    def __repr__(self) -> str:
        body = self.content[:200] if self.content else b""
        return f"{self.method} {self.url} headers={self.headers} body={body!r}"


def operations(schema: dict[str, Any]) -> list[Operation]:
    found = []
    for path, item in sorted(schema.get("paths", {}).items()):
        if path.startswith(SKIPPED_PREFIXES):
            continue
        for method, op in sorted(item.items()):
            if method not in {"get", "post", "put", "patch", "delete", "head"}:
                continue
            body = (
                op.get("requestBody", {})
                .get("content", {})
                .get("application/json", {})
                .get("schema")
            )
            found.append(Operation(method, path, tuple(op.get("parameters", ())), body))
    return found


def _resolve(node: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = schema["components"]["schemas"][name]
    return node


def from_schema(
    node: dict[str, Any], schema: dict[str, Any], depth: int = 0
) -> st.SearchStrategy[Any]:
    """Values valid for *node* (best effort: what the demo's schemas use)."""
    node = _resolve(node, schema)
    if depth > 4:
        return st.none()
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    for key in ("anyOf", "oneOf"):
        if key in node:
            return st.one_of([from_schema(n, schema, depth + 1) for n in node[key]])
    kind = node.get("type")
    if kind == "string":
        lo, hi = node.get("minLength", 0), min(node.get("maxLength", 40), 40)
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: lo <= len(s))
        return st.text(min_size=lo, max_size=max(lo, hi))
    if kind in ("integer", "number"):
        lo = node.get("minimum", node.get("exclusiveMinimum", -(10**6)))
        hi = node.get("maximum", node.get("exclusiveMaximum", 10**6))
        if kind == "integer":
            lo_i = int(lo) + (1 if "exclusiveMinimum" in node else 0)
            hi_i = int(hi) - (1 if "exclusiveMaximum" in node else 0)
            return st.integers(lo_i, max(lo_i, hi_i))
        return st.floats(
            lo,
            hi,
            exclude_min="exclusiveMinimum" in node,
            exclude_max="exclusiveMaximum" in node,
            allow_nan=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(node.get("items", {}), schema, depth + 1)
        return st.lists(
            items, min_size=node.get("minItems", 0), max_size=min(node.get("maxItems", 3), 3)
        )
    if kind == "object" or "properties" in node:
        props = node.get("properties", {})
        required = set(node.get("required", ()))
        fixed = {k: from_schema(v, schema, depth + 1) for k, v in props.items() if k in required}
        optional = {
            k: from_schema(v, schema, depth + 1) for k, v in props.items() if k not in required
        }
        return st.fixed_dictionaries(fixed, optional=optional)
    return json_values


def header_safe(text: str) -> str:
    """*text* reduced to what an HTTP client can send as a header value."""
    return "".join(c for c in text if 0x20 <= ord(c) < 0x7F).strip()


def _maybe_broken(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, valid, valid, json_values)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list) or value is None:
        return json.dumps(value)
    return str(value)


@st.composite
def _request(draw: st.DrawFn, op: Operation, schema: dict[str, Any]) -> FuzzRequest:
    path = op.path
    query: list[tuple[str, str]] = []
    headers: dict[str, str] = {}
    for param in op.parameters:
        name, where = param["name"], param["in"]
        if where == "query" and name in PINNED_QUERY:
            query.append((name, PINNED_QUERY[name]))
            continue
        value_schema = param.get("schema", {})
        if where == "path":
            value = draw(
                _maybe_broken(from_schema(value_schema, schema)).filter(lambda v: _text(v) != "")
            )
            path = path.replace("{" + name + "}", quote(_text(value), safe=""))
        elif not param.get("required") and draw(st.booleans()):
            continue
        elif where == "query":
            query.append((name, _text(draw(_maybe_broken(from_schema(value_schema, schema))))))
        elif where == "header":
            value = draw(header_text | from_schema(value_schema, schema).map(_text))
            headers[name] = header_safe(value)
    url = path + ("?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query) if query else "")
    content: bytes | None = None
    if op.body is not None:
        raw = draw(
            st.one_of(from_schema(op.body, schema), from_schema(op.body, schema), json_values)
        )
        if isinstance(raw, dict):
            raw = {**raw, **{k: v for k, v in PINNED_BODY.items() if k in raw}}
            if isinstance(raw.get("payload"), dict):
                raw["payload"] = {
                    **raw["payload"],
                    **{k: v for k, v in PINNED_BODY.items() if k in raw["payload"]},
                }
        content = draw(st.just(json.dumps(raw).encode()) | st.binary(max_size=40))
        headers.setdefault("content-type", "application/json")
    return FuzzRequest(op.method.upper(), url, headers, content)


def requests_for(op: Operation, schema: dict[str, Any]) -> st.SearchStrategy[FuzzRequest]:
    return _request(op, schema)
