"""imagepipe promote: the promotion gate on the model registry (rollback: rollback.py; lineage:
lineage.py).

promote: registry.model_name's `challenger` and `champion` (the versions the aliases name)
-> both re-scored with ONNX Runtime on the target test split as it is today (data/target)
-> `champion` moves to the challenger only if its ONNX parity passed, the lower end of its
accuracy's 95% bootstrap interval is above the majority-class accuracy of that test split (a
model no better than always answering one class is never champion, not even the first), and
its accuracy is at least the champion's + registry.min_improvement (the first version that
clears the floor becomes champion). The decision and both scores are tagged on both versions;
the replaced champion keeps the alias `previous-champion`. `--json` prints it as one JSON object.
Refusals only `--force` overrides (the reason says so): a challenger that is not this
workspace's models/model.onnx (its `onnx.sha256` tag differs or is missing, or DVC did not keep
the run that registered it: the challenger is an older model), and a rolled-back one (version
tag `rolled_back=true`). It runs in the tracking agent when one is up (agentcall.py).

Concurrency: alias moves (promote's, rollback's) hold a lock (a file on this machine; against
a server also one held on the server), and promote re-reads the champion just before moving it
(compare-and-set): if it moved since it was scored, the decision is taken again; if it became
this challenger meanwhile, this run says so ("already champion (promoted by another run)").
Exit codes: 0 decided (promoted or not; with --missing-ok also "nothing to promote": no
challenger at all), 2 bad input, 75 tracking unreachable.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from commands.gate import decide, hits, load_test_split
from stages.core.door import run_stage
from stages.core.errors import BadInput, Transient
from stages.core.host import project_root
from stages.core.stats import accuracy_interval, majority
from stages.core.tracking import CHALLENGER, CHAMPION, PREVIOUS, Registry, VersionInfo
from stages.core.tracking.agentcall import call
from stages.core.tracking.registry import LockLost
from stages.params import RegistryParams, load_params

# Compare-and-set rounds before giving up (each one re-scores against the moved champion).
_ROUNDS = 3


@dataclass
class Decision:
    promoted: bool
    model_name: str
    challenger_version: str | None
    champion_version: str | None  # the champion the challenger was compared with
    min_improvement: float
    parity_passed: str
    reason: str
    test_images: int
    challenger_accuracy: float | None = None  # None: not scored (refused, already champion)
    champion_accuracy: float | None = None
    current_champion_version: str | None = None  # after the decision
    # The challenger's 95% bootstrap interval and the floor it must clear (this test split).
    challenger_ci_low: float | None = None
    challenger_ci_high: float | None = None
    majority_accuracy: float | None = None
    # The export runs that made the two versions: where `lineage` starts walking back.
    challenger_run_id: str | None = None
    champion_run_id: str | None = None
    # --force overrode a refusal (stale or rolled-back challenger); the reason names it.
    forced: bool = False
    challenger_rolled_back: bool = False

    def tags(self) -> dict[str, str]:
        """The decision as version tags (strings)."""
        def fmt(x: float | None) -> str:
            return "none" if x is None else f"{x:.6f}"

        return {
            "promotion.decision": "promoted" if self.promoted else "rejected",
            "promotion.challenger_version": str(self.challenger_version),
            "promotion.champion_version": str(self.champion_version),
            "promotion.challenger_accuracy": fmt(self.challenger_accuracy),
            "promotion.champion_accuracy": fmt(self.champion_accuracy),
            "promotion.min_improvement": str(self.min_improvement),
            "promotion.reason": self.reason[:5000],
            "promotion.test_images": str(self.test_images),
            "promotion.challenger_ci_low": fmt(self.challenger_ci_low),
            "promotion.challenger_ci_high": fmt(self.challenger_ci_high),
            "promotion.majority_accuracy": fmt(self.majority_accuracy),
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def refusal(challenger: VersionInfo, onnx_path: Path) -> str | None:
    """Why `challenger` must not be promoted from this workspace unless forced; None if fine."""
    from stages.core.integrity import file_sha256
    from stages.core.tracking.registration import not_kept

    v, tags = challenger.version, challenger.tags
    registered = tags.get("onnx.sha256")
    if not onnx_path.is_file():
        return (f"{onnx_path} is not in this workspace: cannot tell whether the challenger v{v} "
                "is its model (dvc pull or dvc repro export first, or --force)")
    if not registered:
        return (f"the challenger v{v} carries no onnx.sha256 tag: cannot tell whether it is "
                f"this workspace's {onnx_path} (--force to promote it anyway)")
    have = file_sha256(onnx_path)
    if have != registered:
        return (f"the challenger v{v} is older than the workspace: export did not register this "
                f"model ({onnx_path} has sha256 {have[:12]}, v{v} was registered from "
                f"{registered[:12]}); run the export stage again (or --force)")
    if (why := not_kept(tags, v, onnx_path)) is not None:
        return why
    if tags.get("rolled_back") == "true":
        return (f"the challenger v{v} was rolled back ({tags.get('rolled_back.time', '?')}): "
                "not promoted again unless asked for explicitly (imagepipe promote --force)")
    return None


def _version(reg: Registry, name: str, alias: str) -> str | None:
    info = reg.alias(name, alias)
    return info.version if info else None


def _decide(reg: Registry, params: RegistryParams, truth: np.ndarray,
            hits_of: Callable[[str], np.ndarray], *, model: Path, force: bool,
            champion_before: str | None) -> Decision:
    """One round's decision on the aliases as they are now, scored without the lock (the
    caller checks under it that they did not move). `hits_of(version)`: its per-image hits."""
    name = params.model_name
    challenger, champion = reg.alias(name, CHALLENGER), reg.alias(name, CHAMPION)
    if challenger is None:
        raise BadInput(f"registered model {name!r} has no {CHALLENGER!r} version: run the "
                       "pipeline (its export stage registers one) before promote")
    parity = challenger.tags.get("parity_passed", "unknown")
    base = dict(model_name=name, challenger_version=challenger.version,
                champion_version=champion.version if champion else None,
                min_improvement=params.min_improvement, parity_passed=parity,
                test_images=len(truth), challenger_run_id=challenger.run_id or None,
                champion_run_id=champion.run_id or None if champion else None,
                challenger_rolled_back=challenger.tags.get("rolled_back") == "true")
    if champion is not None and champion.version == challenger.version:
        by_other = " (promoted by another run)" if champion_before != champion.version else ""
        return Decision(promoted=False, **base,
                        reason=f"version {challenger.version} is already champion{by_other}")
    blocked = refusal(challenger, model)
    if blocked and not force:
        return Decision(promoted=False, reason=blocked, **base)
    chal_hits = hits_of(challenger.version)
    champ_acc, note = None, ""
    if champion is not None:
        try:
            champ_acc = float(np.mean(hits_of(champion.version)))
        except BadInput as err:  # e.g. made for another image size: it cannot serve today's data
            champ_acc, note = 0.0, f"; champion cannot score today's data ({err})"
    chal_acc, ci, floor = float(np.mean(chal_hits)), accuracy_interval(chal_hits), majority(truth)
    promoted, reason = decide(chal_acc, champ_acc, parity, params.min_improvement, ci=ci,
                              majority=floor)
    forced = f"; --force overrode: {blocked}" if blocked else ""
    return Decision(promoted=promoted, challenger_accuracy=chal_acc, champion_accuracy=champ_acc,
                    reason=reason + note + forced, challenger_ci_low=ci[0],
                    challenger_ci_high=ci[1], majority_accuracy=floor[0],
                    forced=bool(blocked), **base)


def _apply(reg: Registry, d: Decision) -> Decision:
    """Move the aliases for a promotion (champion last: one call, so never zero champions),
    then tag both versions with the decision (when the challenger was scored)."""
    name = d.model_name
    if d.promoted and d.challenger_version:
        if d.champion_version:
            reg.set_alias(name, PREVIOUS, d.champion_version)
            reg.tag(name, d.challenger_version,
                    {"promotion.previous_champion": d.champion_version})
        reg.set_alias(name, CHAMPION, d.challenger_version)
        if d.challenger_rolled_back:  # promoted again on purpose (--force): no longer barred
            reg.tag(name, d.challenger_version, {"rolled_back": "false"})
    d.current_champion_version = _version(reg, name, CHAMPION)
    if d.promoted and d.current_champion_version != d.challenger_version:
        # Moved by another holder after our server lock was broken as stale (Registry.lock).
        d.promoted = False
        d.reason = f"lost a race: champion is now {d.current_champion_version}; run promote again"
    if d.challenger_accuracy is not None:  # scored: "already champion", refusals keep theirs
        for version in {d.challenger_version, d.champion_version} - {None}:
            reg.tag(name, str(version), d.tags())
    return d


def promote(params: RegistryParams, data: Path, root: Path, *, model: Path, force: bool,
            missing_ok: bool) -> Decision:
    """Decide and apply one promotion (see the module doc). `model`: this workspace's exported
    model, which the challenger must be; `force`: promote a stale or rolled-back one anyway;
    `missing_ok`: no challenger at all is "nothing to promote", not bad input. Downloads and
    scoring happen without the lock (minutes on a large test split); under it, only the
    compare-and-set and the alias moves."""
    name = params.model_name
    reg = Registry.connect(root)
    if missing_ok and reg.alias(name, CHALLENGER) is None:  # a fresh clone, or nothing exported
        now = _version(reg, name, CHAMPION)
        return Decision(promoted=False, model_name=name, challenger_version=None,
                        champion_version=now, min_improvement=params.min_improvement,
                        parity_passed="n/a", test_images=0, current_champion_version=now,
                        reason=f"nothing to promote: registered model {name!r} has no "
                               f"{CHALLENGER!r} version (the export stage registers one when it "
                               "runs)")
    images, truth = load_test_split(data)
    before = _version(reg, name, CHAMPION)
    with tempfile.TemporaryDirectory(prefix="imagepipe-promote-") as tmp:

        @functools.cache  # a version is scored once, whatever the rounds
        def hits_of(version: str) -> np.ndarray:
            _, onnx_path = reg.download(name, version, Path(tmp) / version, by_version=True)
            return hits(onnx_path, images, truth)

        for _ in range(_ROUNDS):
            decision = _decide(reg, params, truth, hits_of, model=model, force=force,
                               champion_before=before)
            try:
                with reg.lock(name):
                    # Compare-and-set: both aliases must still be the versions decided on.
                    if (_version(reg, name, CHAMPION) == decision.champion_version
                            and _version(reg, name, CHALLENGER) == decision.challenger_version):
                        return _apply(reg, decision)
            except LockLost as err:  # stalled past the stale limit: decide again, lock again
                print(f"promote: {err}; deciding again", file=sys.stderr)
    raise Transient(f"the aliases of {name} kept moving during {_ROUNDS} promotion rounds; run "
                    "promote again")


# ---------------------------------------------------------------- command lines


def command_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options promote, rollback and lineage share."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model-name", help="overrides registry.model_name")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def registry_params(args: argparse.Namespace) -> RegistryParams:
    params = load_params(args.params).registry
    return params.model_copy(update={"model_name": args.model_name}) if args.model_name else params


def print_result(result: dict[str, Any], as_json: bool, summary: str) -> None:
    print(json.dumps(result, sort_keys=True) if as_json else summary, flush=True)


def version_text(v: str | None, none: str) -> str:
    return f"v{v}" if v else none


def said(d: dict[str, Any]) -> str:
    """A decision (Decision as a dict: also what --json printed) in one line."""
    who = str(d.get("model_name"))
    if d.get("challenger_version"):  # else nothing to promote
        who += f" v{d['challenger_version']} {'promoted' if d.get('promoted') else 'not promoted'}"
    now = version_text(d.get("current_champion_version"), "no champion")
    return f"{who}: {d.get('reason')} (champion now: {now})"


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("imagepipe promote", "promote the challenger if it beats the champion")
    parser.add_argument("--data", default="data/target", type=Path,
                        help="dataset whose test split both models are scored on")
    parser.add_argument("--model", default="models/model.onnx", type=Path,
                        help="this workspace's exported model: the challenger must be it")
    parser.add_argument("--force", action="store_true",
                        help="promote a challenger that is not the workspace's model or was "
                             "rolled back (the accuracy gate still applies)")
    parser.add_argument("--missing-ok", action="store_true",
                        help="no challenger version at all is 'nothing to promote' (exit 0), "
                             "not an error: for a run that exported nothing")
    args = parser.parse_args(argv)

    def body() -> None:  # in the tracking agent when one runs: mlflow is imported there
        d = call("commands.promote:promote", promote, registry_params(args), args.data,
                 project_root(), model=args.model, force=args.force, missing_ok=args.missing_ok)
        print_result(asdict(d), args.json, said(asdict(d)))

    return run_stage("promote", body, track=False)
