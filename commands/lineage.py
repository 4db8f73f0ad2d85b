"""imagepipe lineage: a registered model version (or an ONNX file someone was handed) -> the runs,
code, data and params that made it.

A short summary a person reads (version and aliases, accuracy with its interval, parity, git
commit, one line per run back to ingest, data hashes), or everything with --json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from commands.promote import command_parser, registry_params
from stages.core.door import run_stage
from stages.core.errors import BadInput
from stages.core.lineage import DIFF_ARTIFACT
from stages.params import RegistryParams


def lineage(params: RegistryParams, ref: str) -> dict[str, Any]:
    """The runs that made a version (ref: a version number, an alias, or a file NAME.onnx: the
    newest version registered from those bytes, found by their sha256)."""
    from stages.core.tracking import Registry

    reg = Registry.connect()
    if ref.endswith(".onnx"):
        version = _version_of_file(reg, params.model_name, Path(ref))
    else:
        version = reg.find(params.model_name, ref, by_version=ref.isdigit()).version
    return reg.walk_back(params.model_name, version)


def _version_of_file(reg: Any, name: str, path: Path) -> str:
    """The ONNX file names no run (its bytes are a function of its inputs: export.py); the
    registry's onnx.sha256 tag leads from the bytes to the version."""
    from stages.core.integrity import file_sha256

    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    digest = file_sha256(path)
    found = reg.tagged(name, "onnx.sha256", digest)
    if found is None:
        raise BadInput(f"no version of {name!r} was registered from {path} (sha256 "
                       f"{digest[:12]}): a file exported but never registered, or another model "
                       "name (--model-name)")
    return found.version


def _own_accuracy(tags: dict[str, str], version: str) -> str | None:
    """This version's accuracy as promote last re-scored it (the tags hold both sides')."""
    side = ("challenger" if tags.get("promotion.challenger_version") == version else
            "champion" if tags.get("promotion.champion_version") == version else None)
    acc = tags.get(f"promotion.{side}_accuracy", "none") if side else "none"
    if acc == "none":
        return None
    ci = ""
    if side == "challenger" and tags.get("promotion.challenger_ci_low", "none") != "none":
        ci = (f" [{float(tags['promotion.challenger_ci_low']):.4f}, "
              f"{float(tags['promotion.challenger_ci_high']):.4f}]")
    return (f"{float(acc):.4f}{ci} on {tags.get('promotion.test_images', '?')} test images "
            f"(promote, {tags.get('promotion.time', '?')})")


def lineage_summary(walked: dict[str, Any]) -> str:
    """A few lines a person reads: version and aliases, accuracy, commit, each run, data."""
    tags, runs, version = walked.get("tags", {}), walked.get("runs", []), walked["version"]
    order = {"champion": 0, "challenger": 1, "previous-champion": 2}
    aliases = ", ".join(sorted(walked.get("aliases") or [], key=lambda a: (order.get(a, 3), a)))
    aliases = aliases or "no alias"
    lines = [f"{walked['model']} v{version} ({aliases})"]
    evaluated = next((r["metrics"] for r in runs if r.get("stage") == "evaluate"
                      and "accuracy" in r.get("metrics", {})), None)
    if evaluated:
        low, high = evaluated.get("accuracy_ci_low"), evaluated.get("accuracy_ci_high")
        ci = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
        lines.append(f"  accuracy {evaluated['accuracy']:.4f}{ci} (evaluate)")
    rescored = _own_accuracy(tags, version)
    if rescored:
        lines.append(f"  accuracy {rescored}")
    lines.append(f"  parity passed: {tags.get('parity_passed', '?')}; onnx sha256 "
                 f"{tags.get('onnx.sha256', '?')[:12]}")
    if tags.get("rolled_back") == "true":
        lines.append(f"  rolled back {tags.get('rolled_back.time', '')}: not promoted again "
                     "without --force")
    head = runs[0]["lineage"] if runs else {}
    dirty = ""
    if head.get("git.dirty") == "true":  # the code that ran is the commit plus this diff
        dirty = f" (dirty: the diff that ran is {DIFF_ARTIFACT} of run {runs[0]['run_id']})"
    lines.append(f"  git commit {head.get('git.commit', 'unknown')[:12]}{dirty}")
    for run in runs:
        lin = run.get("lineage", {})
        # Data and models; the code deps are what the commit (and a dirty run's diff) name.
        deps = ", ".join(f"{k[len('dvc.dep.'):]} {v[:8]}" for k, v in lin.items()
                         if k.startswith("dvc.dep.") and not k.endswith(".py"))
        commit = f"  commit {lin['git.commit'][:8]}" if lin.get("git.commit") else ""
        lines.append(f"  {run.get('stage', '?'):<9} run {run['run_id']}  {run.get('status', '?')}"
                     f"{commit}" + (f"  from: {deps}" if deps else ""))
    data = [f"{k[len('data.'):]} {v[:12]}" for k, v in sorted(tags.items())
            if k.startswith("data.") and k.endswith("sha256")]
    if data:
        lines.append(f"  data: {', '.join(data)}")
    lines.append("  (--json for everything: params, metrics, all lineage tags)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("imagepipe lineage", "the runs that made a model version: a summary, or "
                                          "everything with --json")
    parser.add_argument("ref", nargs="?", default="champion",
                        help="version number, alias, or an ONNX file NAME.onnx (found by its sha256)")
    args = parser.parse_args(argv)

    def body() -> None:
        walked = lineage(registry_params(args), args.ref)
        print(json.dumps(walked, indent=2, sort_keys=True) if args.json
              else lineage_summary(walked), flush=True)

    return run_stage("lineage", body, track=False)
