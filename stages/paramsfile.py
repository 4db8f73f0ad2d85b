"""A params file's text, made safe to parse before YAML sees it: it exists and is a file, at
most MAX_FILE_BYTES, UTF-8 (a byte-order mark allowed), and not nested past MAX_FLOW_DEPTH.

Input: a path. Output: its YAML (read_yaml), or BadInput naming the file and what is wrong
with it in one line. stages/params.py's load_params (the only reader of params files)
validates what read_yaml gives.
"""

from __future__ import annotations

import re
from itertools import accumulate
from pathlib import Path
from typing import Any

import yaml

from stages.core.errors import BadInput

MAX_FILE_BYTES = 2**20  # a params file is a few KB: a larger one is another file given by mistake
# PyYAML's scanner is quadratic in the nesting of flow collections ([[[...]]]): ~500 levels, where
# Python's recursion limit stops its composer, took 6-15 s on a loaded 2-core machine. Counted
# first, brackets in quoted strings or comments included: a params file has a few levels.
MAX_FLOW_DEPTH = 32


def read_yaml(path: Path) -> Any:
    """The params file at `path` parsed as YAML (not yet validated: stages/params.py does that),
    or BadInput naming the file and what is wrong with it in one line."""
    text = _read_text(path)
    steps = (1 if bracket in "[{" else -1 for bracket in re.findall(r"[\[\]{}]", text))
    if max(accumulate(steps), default=0) > MAX_FLOW_DEPTH:
        raise BadInput(f"params: {path} is nested too deeply for a params file (over "
                       f"{MAX_FLOW_DEPTH} levels of [ ] or {{ }})")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # PATH:LINE:COLUMN, 1-based as editors count
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise BadInput(f"params: {where} is not valid YAML: "
                       f"{getattr(err, 'problem', None) or err}".splitlines()[0]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise BadInput(f"params: {path} is nested too deeply for a params file (sections "
                       "hold keys, a few levels deep)") from None


def _read_text(path: Path) -> str:
    """The file's text: UTF-8 (a UTF-8 byte-order mark is allowed), at most MAX_FILE_BYTES."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise BadInput(f"params: {path} does not exist") from None
    except IsADirectoryError:
        raise BadInput(f"params: {path} is a folder; give the params file (YAML), e.g. "
                       f"--params params.yaml") from None
    except OSError as err:
        raise BadInput(f"params: {path} cannot be read ({err.strerror or err})") from None
    if len(data) > MAX_FILE_BYTES:
        raise BadInput(f"params: {path} is over {MAX_FILE_BYTES // 2**20} MB; a params file is a "
                       "few KB (is it the right file?)") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise BadInput(f"params: {path} is not UTF-8 text ("
                       + ("UTF-16, by its byte-order mark" if utf16 else
                          f"byte {data[err.start]:#04x} at offset {err.start}")
                       + "); save it as UTF-8") from None
