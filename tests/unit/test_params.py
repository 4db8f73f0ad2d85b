"""params.yaml validation: every bad value is one line naming the dotted key, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from stages.core.errors import BadInput
from stages.params import Params, load_params, parse_params
from tests.helpers import REPO, default_params, run_stage, write_params


def test_committed_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source.uri == "sklearn:digits"


def _set(d: dict, dotted: str, value: object) -> None:
    *path, last = dotted.split(".")
    for key in path:
        d = d.setdefault(key, {})
    d[last] = value


BAD = [
    ("augment.copiez", 2, "augment.copiez", "unknown key"),
    ("augment.copies", -1, "augment.copies", "greater than or equal to 0"),
    ("augment.copies", "many", "augment.copies", "integer"),
    ("data.image_size", 0, "data.image_size", "greater than or equal to 8"),
    ("data.source.classes", [], "data.source.classes", "at least 2 items"),
    # One class: finetune and evaluate then reported accuracy 1.0 for any model.
    ("data.target.classes", ["5"], "data.target.classes", "at least 2 items"),
    ("data.max_bad_fraction", 1.5, "data.max_bad_fraction", "less than or equal to 1"),
    ("data.val_fraction", -0.1, "data.val_fraction", "greater than or equal to 0"),
    ("data.target.uri", "ftp://x", "data.target.uri", "pattern"),
    ("pretrain.lr", -0.01, "pretrain.lr", "greater than 0"),
    ("finetune.backbone_lr_scale", 2.0, "finetune.backbone_lr_scale", "less than or equal to 1"),
    ("augment.crop_scale", [0.9, 0.5], "augment", "crop_scale"),
    ("bogus_section", {}, "bogus_section", "unknown key"),
    # Every float is finite (`lr: .inf` trained on NaN; `parity_atol: .inf` passed any model).
    ("pretrain.lr", float("inf"), "pretrain.lr", "finite"),
    ("finetune.lr", float("nan"), "finetune.lr", "finite"),
    ("export.parity_atol", float("inf"), "export.parity_atol", "finite"),
    ("augment.crop_scale", [0.5, float("nan")], "augment.crop_scale.1", "finite"),
    ("data.max_file_mb", float("inf"), "data.max_file_mb", "finite"),
    ("data.max_file_mb", 0, "data.max_file_mb", "greater than 0"),
    # YAML booleans are not numbers (`epochs: true` ran one epoch), nor numbers booleans.
    ("pretrain.epochs", True, "pretrain.epochs", "boolean is not a number"),
    ("data.channels", True, "data.channels", "boolean is not a number"),
    ("finetune.lr", False, "finetune.lr", "boolean is not a number"),
    ("augment.crop_scale", [True, 1.0], "augment.crop_scale", "boolean is not a number"),
    ("pretrain.hflip", 1, "pretrain.hflip", "true or false"),
    ("data.follow_symlinks", "yes", "data.follow_symlinks", "true or false"),
    # Several machines train with Ray Train (pretrain.engine: ray) only.
    ("finetune.nodes", 2, "finetune.nodes", "unknown key"),
    ("pretrain.rdzv_endpoint", "node0:29400", "pretrain.rdzv_endpoint", "unknown key"),
]


@pytest.mark.parametrize(("key", "value", "named", "allowed"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_value_names_the_key(key: str, value: object, named: str, allowed: str) -> None:
    raw = default_params()
    _set(raw, key, value)
    with pytest.raises(BadInput) as err:
        parse_params(raw)
    line = str(err.value)
    assert "\n" not in line
    assert f"params.{named}" in line
    assert allowed in line


def test_missing_required_section_is_named() -> None:
    raw = default_params()
    del raw["data"]["target"]
    with pytest.raises(BadInput, match=r"params\.data\.target: required"):
        parse_params(raw)


def test_params_are_frozen() -> None:
    params = parse_params(default_params())
    with pytest.raises(ValidationError):
        params.augment.copies = 5  # type: ignore[misc]


@pytest.mark.parametrize("module", ["ingest", "augment"])
def test_stage_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, module: str) -> None:
    raw = default_params()
    raw["augment"]["copies"] = -3
    params = write_params(tmp_path / "params.yaml", raw)
    out = tmp_path / "out"
    args = ["--params", params, "--out", out]
    if module == "augment":
        args += ["--source", tmp_path / "nothing", "--metrics", tmp_path / "m.json",
                 "--preview", tmp_path / "p.png"]
    proc = run_stage(module, *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "augment.copies" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_several_machines_without_ray_exit_2_naming_engine_ray(tmp_path: Path) -> None:
    """nodes: 2 with the in-stage launch (engine local), which trains one machine's processes."""
    raw = default_params()
    raw["pretrain"]["nodes"] = 2
    params, out = write_params(tmp_path / "params.yaml", raw), tmp_path / "out"
    proc = run_stage("pretrain", "--params", params, "--data", tmp_path / "nothing",
                     "--model", out / "m.pt", "--checkpoints", out / "ck",
                     "--metrics", out / "m.json", "--plot", out / "p.csv")
    assert proc.returncode == 2, proc.stderr
    assert "several machines train with pretrain.engine: ray" in proc.stderr
    assert not out.exists()
    raw["pretrain"]["engine"] = "ray"
    assert parse_params(raw).pretrain.nodes == 2


def test_unreadable_yaml_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    proc = run_stage("ingest", "--params", bad, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "not valid YAML" in proc.stderr


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 0\ndata:\n  source: {uri: sklearn:digits\n  target: 3\n")
    with pytest.raises(BadInput) as err:
        load_params(bad)
    # Line 4 is where the flow mapping of line 3 turns out unclosed; column 9 is the ':' there.
    assert str(err.value).startswith(f"params: {bad}:4:9 is not valid YAML: expected ',' or '}}'")
    assert "\n" not in str(err.value)


def test_new_data_keys_have_safe_defaults() -> None:
    data = parse_params(default_params()).data
    assert data.follow_symlinks is False
    assert 0 < data.max_file_mb < float("inf")


@pytest.mark.parametrize("name", ["params.yaml", "params/cifar10.yaml"])
def test_a_dvc_set_param_edits_only_its_own_line(name: str, tmp_path: Path) -> None:
    # `dvc exp run -S` rewrites the file with DVC's YAML writer: a file already in its form
    # (list indentation, quoting, null as empty) keeps every other line and every comment.
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    copy.write_bytes((REPO / name).read_bytes())
    apply_overrides(str(copy), ["seed=7"])
    before = (REPO / name).read_text().splitlines()
    after = copy.read_text().splitlines()
    assert len(before) == len(after)
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert len(changed) == 1 and changed[0][1].startswith("seed: 7"), changed
