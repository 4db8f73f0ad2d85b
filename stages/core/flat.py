"""Nested mappings as one level of dotted keys: params for MLflow, metrics files for the run and
the flow's report, and the params a flow run changed. Input: any JSON-like value; output: a
flat dict."""

from __future__ import annotations

from typing import Any


def flatten_dict(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys ({"a": {"b": 1}} -> {"a.b": 1}); anything
    that is not a mapping (lists included) is a leaf."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten_dict(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
