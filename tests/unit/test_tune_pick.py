"""`imagepipe tune pick`'s choice on rows as `dvc exp show --json` gives them: a loss is
minimised, the direction can be forced, ties are said (the sweep itself runs in
tests/integration/test_dvc_experiments.py)."""

from __future__ import annotations

import pytest

from commands.tune import Row, direction_of, main, pick, rows_of, table


def _row(name: str, val_loss: float, val_acc: float) -> Row:
    return Row(name, False, {"finetune.lr": val_acc},
               {"finetune.val_loss": val_loss, "finetune.val_accuracy": val_acc})


ROWS = [_row("worst", 2.5, 0.50), _row("best", 0.3, 0.90), _row("middle", 1.0, 0.70)]


def test_a_loss_is_minimised_by_name() -> None:
    assert direction_of("finetune.val_loss") == "min"
    assert direction_of("finetune.val_accuracy") == "max"
    assert direction_of("finetune.scratch_val_accuracy") == "max"
    chosen, notes = pick(ROWS, "finetune.val_loss", None, direction_of("finetune.val_loss"))
    assert chosen.name == "best", notes
    assert notes == ["best by finetune.val_loss (lowest): best (0.3000)"]
    # The table lists the best first in the same direction.
    lines = table(ROWS, ["finetune.val_loss"], chosen, "min").splitlines()
    assert lines[1].startswith("* best") and lines[-1].lstrip().startswith("worst")


def test_the_direction_flag_overrides_the_name() -> None:
    assert pick(ROWS, "finetune.val_loss", None, "max")[0].name == "worst"
    assert pick(ROWS, "finetune.val_accuracy", None, "min")[0].name == "worst"


def test_ties_are_said_and_go_to_the_first_row() -> None:
    rows = [_row("a", 0.5, 0.8), _row("b", 0.4, 0.9), _row("c", 0.6, 0.9)]
    chosen, notes = pick(rows, "finetune.val_accuracy", None, "max")
    assert chosen.name == "b"
    assert "a tie between b, c: b is the first" in notes[0], notes
    assert "tie" not in pick(rows, "finetune.val_loss", None, "min")[1][0]


def test_a_test_metric_is_refused_through_the_door(capsys: pytest.CaptureFixture[str]) -> None:
    # Before DVC is asked anything: exit 2 and the one line every command's door prints.
    assert main(["pick", "--metric", "evaluate.accuracy"]) == 2
    assert "tune: error: --metric evaluate.accuracy: not a validation metric" in capsys.readouterr().err


def _record(rev: str, lr: float | None, acc: float | None = None, name: str | None = None,
            experiments: list[dict] | None = None) -> dict:
    data = {} if lr is None else {
        "params": {"params.yaml": {"data": {"finetune": {"lr": lr}}}},
        "metrics": {"metrics/finetune.json": {"data": {"val_accuracy": acc}}}}
    return {"rev": rev, "name": name, "data": data, "error": None, "experiments": experiments}


def test_rows_are_the_baseline_and_its_finished_experiments() -> None:
    shown = [_record("workspace", 0.5, 0.99),  # half-written numbers: never a row
             _record("abcdef123", 0.1, 0.6, experiments=[
                 {"revs": [_record("e1", 0.03, 0.8, name="exp-a")]},
                 {"revs": [_record("e2", None, name="exp-queued")]},  # no data yet
                 {"revs": []}])]
    rows = rows_of(shown)
    assert [(r.name, r.baseline) for r in rows] == [("HEAD (abcdef1)", True), ("exp-a", False)]
    assert rows[1].params == {"finetune.lr": 0.03}
    assert rows[1].metrics == {"finetune.val_accuracy": 0.8}


def test_without_a_row_holding_both_bests_the_pick_stays_the_finetuned_best() -> None:
    rows = [Row("a", False, {"finetune.lr": 0.03, "finetune.scratch_lr": 0.003},
                {"finetune.val_accuracy": 0.9, "scratch.val_accuracy": 0.6}),
            Row("d", False, {"finetune.lr": 0.1, "finetune.scratch_lr": 0.01},
                {"finetune.val_accuracy": 0.8, "scratch.val_accuracy": 0.7})]
    chosen, notes = pick(rows, "finetune.val_accuracy", "scratch.val_accuracy", "max")
    assert chosen.name == "a"
    assert notes[1].endswith("finetune.scratch_lr=0.01")
    assert notes[2] == "no experiment has both (not a full grid): keeping a"
