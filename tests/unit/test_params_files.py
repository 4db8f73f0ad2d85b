"""Bad params files (not bad values): each is one line on stderr and exit 2, never a traceback.

The files are real: UTF-16 and invalid UTF-8 bytes, a folder, YAML nested past Python's
recursion limit, a file far larger than any params file; and unbounded numbers (1.0e30),
which pydantic accepts as integers unless the key has an upper bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel

from stages.core.errors import BadInput
from stages.params import Params, load_params, parse_params
from tests.helpers import REPO, default_params, run_stage


def _utf16(path: Path) -> str:
    path.write_bytes((REPO / "params.yaml").read_text().encode("utf-16"))
    return "UTF-16"


def _latin1(path: Path) -> str:
    # A class name typed in an editor that saved Latin-1: é is one byte, 0xe9, not UTF-8.
    text = (REPO / "params.yaml").read_text().replace("    - '0'\n", "    - 'caf\u00e9'\n", 1)
    path.write_bytes(text.encode("latin-1"))
    return "byte 0xe9"


def _folder(path: Path) -> str:
    path.mkdir()
    return "is a folder"


def _nested(path: Path) -> str:
    path.write_text("seed: 0\ndata: " + "[" * 100_000 + "]" * 100_000 + "\n")
    return "nested too deeply"


def _nested_mapping(path: Path) -> str:
    path.write_text("seed: 0\ndata: " + "{a: " * 50_000 + "1" + "}" * 50_000 + "\n")
    return "nested too deeply"


def _nested_blocks(path: Path) -> str:
    # Indentation, not brackets: 1,200 levels in 0.7 MB, past Python's recursion limit.
    path.write_text("seed: 0\ndata:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(1200))
                    + " " * 1201 + "1\n")
    return "nested too deeply"


def _huge(path: Path) -> str:
    with path.open("w") as f:
        f.write((REPO / "params.yaml").read_text())
        f.write("# padding\n" * 300_000)  # 3 MB: over the limit of 1 MB, valid YAML
    return "a params file is a few KB"


FILES = {"utf16": _utf16, "latin1": _latin1, "folder": _folder, "nested": _nested,
         "nested_mapping": _nested_mapping, "nested_blocks": _nested_blocks, "huge": _huge}


@pytest.mark.parametrize("make", FILES.values(), ids=FILES.keys())
def test_bad_file_is_one_line(tmp_path: Path, make: Any) -> None:
    path = tmp_path / "params.yaml"
    said = make(path)
    with pytest.raises(BadInput) as err:
        load_params(path)
    line = str(err.value)
    assert line.startswith(f"params: {path}") and said in line and "\n" not in line, line


@pytest.mark.parametrize("module", ["ingest", "pretrain"])
@pytest.mark.parametrize("make", [_utf16, _folder, _nested], ids=["utf16", "folder", "nested"])
def test_stage_exits_2_on_a_bad_file(tmp_path: Path, make: Any, module: str) -> None:
    path = tmp_path / "params.yaml"
    make(path)
    args = ["--out", tmp_path / "out"] if module == "ingest" else [
        "--data", tmp_path / "none", "--model", tmp_path / "m.pt", "--checkpoints",
        tmp_path / "ck", "--metrics", tmp_path / "m.json", "--plot", tmp_path / "p.csv"]
    proc = run_stage(module, "--params", path, *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and str(path) in lines[0]


def test_flow_nesting_is_refused_past_max_flow_depth_not_at_it(tmp_path: Path) -> None:
    """Depth is the deepest point, not the bracket count: closed lists side by side are shallow."""
    from stages.paramsfile import MAX_FLOW_DEPTH, read_yaml

    path = tmp_path / "params.yaml"
    path.write_text("a: [" + "[[]], " * 100 + "[" * (MAX_FLOW_DEPTH - 1) + "]" * MAX_FLOW_DEPTH)
    assert read_yaml(path)["a"][0] == [[]]
    path.write_text("a: " + "[" * (MAX_FLOW_DEPTH + 1) + "]" * (MAX_FLOW_DEPTH + 1))
    with pytest.raises(BadInput, match=f"over {MAX_FLOW_DEPTH} levels"):
        read_yaml(path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (REPO / "params.yaml").read_bytes())
    assert load_params(path) == load_params(REPO / "params.yaml")


def _numbers(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, field) of every int or float key of the schema, sections included."""
    out = []
    for name, field in model.model_fields.items():
        kinds = {field.annotation, *get_args(field.annotation)}
        sub = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if sub:
            out += _numbers(sub[0], f"{prefix}{name}.")
        elif kinds & {int, float} or any(get_args(k) and {int, float} & set(get_args(k))
                                         for k in kinds):
            out.append((f"{prefix}{name}", field))
    return out


NUMBERS = [key for key, _ in _numbers(Params)]


@pytest.mark.parametrize("value", ["1.0e+30", "1.0e+15"])
@pytest.mark.parametrize("key", NUMBERS)
def test_every_number_is_bounded(key: str, value: str) -> None:
    # YAML floats, integral ones: pydantic takes 1e15 for an int key (1e30 overflows its own
    # parser), and either for a float key unless it has an upper bound.
    raw = default_params()
    *path, last = key.split(".")
    node = raw
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(str(2**64) if key == "seed" else value)  # past torch's seeds
    with pytest.raises(BadInput) as err:
        parse_params(raw)
    # A key with a choice of types (devices: a number or "auto") is named with the choice tried.
    assert str(err.value).startswith((f"params.{key}: ", f"params.{key}.")), str(err.value)


def test_the_bounds_are_found() -> None:
    # The walk above sees the keys that crashed before (and so is no empty parametrisation).
    assert {"pretrain.width", "seed", "finetune.batch_size", "data.batch_size",
            "data.source.train_per_class", "export.threads"} <= set(NUMBERS)


def test_a_huge_width_is_exit_2_not_a_crash(tmp_path: Path) -> None:
    raw = default_params()
    raw["pretrain"]["width"] = 1.0e15
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = run_stage("pretrain", "--params", path, "--data", tmp_path / "none", "--model",
                     tmp_path / "m.pt", "--checkpoints", tmp_path / "ck", "--metrics",
                     tmp_path / "m.json", "--plot", tmp_path / "p.csv")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "params.pretrain.width: Input should be less than or equal to 1024" in proc.stderr
