"""A stage's command line (stages/core/door.py `arguments`): --params and the stage's paths,
whose defaults are what dvc.yaml passes."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from stages.core.door import arguments
from tests.helpers import REPO


def test_a_stage_command_line_is_params_and_its_paths() -> None:
    args = arguments("evaluate", "evaluate: a -> b\n\nMore.", ["--per-class", "x.json"],
                     per_class="reports/per_class.json", metrics="metrics/evaluate.json")
    assert args.params == "params.yaml"
    assert (args.per_class, args.metrics) == (Path("x.json"), Path("metrics/evaluate.json"))
    with pytest.raises(SystemExit):
        arguments("evaluate", None, ["--per_class", "x.json"], per_class="y.json")


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "scratch"])
def test_a_training_stage_defaults_to_what_dvc_yaml_passes(stage: str) -> None:
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    module = importlib.import_module(f"stages.{stage}")
    assert module.arguments(shlex.split(cmd)[3:]) == module.arguments([])
