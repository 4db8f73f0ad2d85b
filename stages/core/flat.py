"""Nested mappings as one level of dotted keys (params.py's params for MLflow), and what differs
between two such trees (a checkpoint's fingerprint against this run's). Input: JSON-like
values; output: a flat dict or lines 'key: old -> new'."""

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


def differences(old: Any, new: Any) -> list[str]:
    """'key: old -> new' for every dotted key whose value differs ('(unset)' where one lacks it)."""
    before, after, missing = flatten_dict(old), flatten_dict(new), object()
    return [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}"
            for k in sorted(set(before) | set(after)) if before.get(k, missing) != after.get(k, missing)]
