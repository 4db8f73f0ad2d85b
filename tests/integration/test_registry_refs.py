"""Naming a registered version that is not there is the user's mistake, exit 2 with one line
naming it, not exit 75 ("transient, retry may help"): `imagepipe lineage 99`, `imagepipe
predict models:/NAME@nosuch`, an unknown model name. MLflow's own `models:/NAME/VERSION` form
is accepted beside `models:/NAME@ALIAS`. Real SQLite store, a version registered by the export
stage's door (conftest's tiny_export)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commands import predict
from commands.lineage import main as lineage_main
from stages.core.errors import EXIT_BAD_INPUT

pytestmark = pytest.mark.slow
NAME = "imagepipe-classifier"


def test_not_found_in_the_registry_is_exit_2_and_a_version_number_is_accepted(
        project: Path, tiny_export: Callable[..., int], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    assert tiny_export("good") == 0  # version 1, alias challenger
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((12, 12), 200, dtype=np.uint8)).save(photo)
    capsys.readouterr()

    assert lineage_main(["99"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"models:/{NAME}/99 is not in the registry" in err, err
    assert lineage_main(["--model-name", "no-such-model", "1"]) == EXIT_BAD_INPUT
    assert "models:/no-such-model/1 is not in the registry" in capsys.readouterr().err

    assert predict.main([f"models:/{NAME}@nosuch", str(photo)]) == EXIT_BAD_INPUT
    assert f"models:/{NAME}@nosuch is not in the registry" in capsys.readouterr().err
    assert predict.main([f"models:/{NAME}/7", str(photo)]) == EXIT_BAD_INPUT
    assert f"models:/{NAME}/7 is not in the registry" in capsys.readouterr().err

    # MLflow's version form, as the alias form: the same model, the same answer.
    assert predict.main([f"models:/{NAME}/1", str(photo), "--json"]) == 0
    by_version = capsys.readouterr()
    assert f"models:/{NAME}/1 is version 1" in by_version.err
    assert predict.main([f"models:/{NAME}@challenger", str(photo), "--json"]) == 0
    assert capsys.readouterr().out == by_version.out


def test_an_onnx_file_leads_to_the_version_registered_from_it(
        project: Path, tiny_export: Callable[..., int], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """Serving holds a file, not a version number: the file's sha256 finds its version."""
    assert tiny_export("good") == 0  # version 1
    assert tiny_export("bad") == 0  # version 2, other weights, other bytes
    handed = tmp_path / "served.onnx"
    handed.write_bytes((project / "models" / "model.onnx").read_bytes())  # v2's bytes
    capsys.readouterr()
    assert lineage_main(["--json", str(handed)]) == 0
    walked = json.loads(capsys.readouterr().out)
    assert walked["version"] == "2"
    stranger = tmp_path / "stranger.onnx"
    stranger.write_bytes(b"not a registered model")
    assert lineage_main([str(stranger)]) == EXIT_BAD_INPUT
    assert "no version of" in capsys.readouterr().err
    assert lineage_main([str(tmp_path / "missing.onnx")]) == EXIT_BAD_INPUT
    assert "no such file" in capsys.readouterr().err
    # A file named like a version number does not shadow the version: only NAME.onnx is a file.
    (project / "1").write_bytes(b"not a model")
    assert lineage_main(["--json", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "1"


def test_registering_in_this_process_leaves_no_tracking_uri_behind(
        project: Path, tiny_export: Callable[..., int], monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI. Registration used to leave it set:
    in the tests' process the next test's deployment then sent its runs to this store (the
    nightly-deployment test failed that way, twice on CI)."""
    import os

    from stages.core.tracking.remote import AGENT_ENV

    monkeypatch.setenv(AGENT_ENV, "0")  # registration in this process, not the agent's
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    assert tiny_export("good") == 0
    assert [v for v in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") if v in os.environ] == []
