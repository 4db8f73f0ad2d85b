"""Bounded fuzzing of the two places untrusted input enters: the image reader and params loading.

image reader: bytes mutated from small valid PNG/JPEG/GIF/BMP/TIFF seeds, plus raw random bytes,
written to a file -> stages.core.sources.read_image_file + canonical. The contract: a uint8
H x W x C array of the asked shape, or BadFile. Anything else (another exception, a hang, a wrong
shape) is a finding.
params: the default params.yaml with values swapped for random ones (wrong types, inf/nan,
booleans for numbers, huge numbers, nested junk) and random text -> stages.params.load_params.
The contract: a Params object, or BadInput whose message starts with "params". Anything else is
a finding.
params files: the file itself rather than its values -> load_params, same contract: params.yaml
in other encodings (UTF-16, UTF-32, Latin-1, ...), random bytes spliced in, YAML nested up to
200,000 levels in brackets or 1,400 by indentation, padded up to 4 MB, a folder where the file
should be.

hypothesis generates both, in seeded rounds (repeatable); each has a time budget
(IMAGEPIPE_FUZZ_SECONDS, default 30 s each). Results: benchmarks/results/fuzz.json.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from stages.core.errors import BadInput
from stages.core.imageform import canonical
from stages.core.sources import BadFile, read_image_file
from stages.params import load_params

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fuzz.json"
BUDGET_S = float(os.environ.get("IMAGEPIPE_FUZZ_SECONDS", "30"))


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "L"), ("TIFF", "RGBA"),
                      ("PNG", "I;16")):
        arr = rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB").convert(mode) if mode != "I;16" else \
            Image.fromarray(arr[..., 0].astype(np.uint16) * 250)
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


def _mutated(seed: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data[:cut] if cut else data)


class Campaign:
    """Counts inputs, collects findings, stops when the budget is spent."""

    def __init__(self, name: str) -> None:
        self.name, self.tried, self.findings = name, 0, []
        self.deadline = time.monotonic() + BUDGET_S
        self.outcomes: dict[str, int] = {}

    def tick(self) -> None:
        self.tried += 1

    def outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def finding(self, what: str, data: Any) -> None:
        if len(self.findings) < 20:
            self.findings.append({"what": what, "input": repr(data)[:300]})

    def run(self, strategy: Any, body: Any) -> dict[str, Any]:
        """Rounds of 200 examples, each with its own seed (repeatable), until the budget is spent:
        hypothesis has no time budget of its own, and an exception to stop it counts as a failure."""
        start = time.monotonic()
        for round_ in range(10**6):
            if time.monotonic() > self.deadline:
                break
            try:
                def test(case: Any) -> None:  # a new function each round: hypothesis wraps it
                    body(case)

                settings(max_examples=200, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))(
                    seed(round_)(given(strategy)(test)))()
            except Exception as err:  # noqa: BLE001 - the harness itself failed: say so
                self.finding(f"harness: {type(err).__name__}: {err}"[:300], f"round {round_}")
        return {"inputs": self.tried, "seconds": round(time.monotonic() - start, 1),
                "outcomes": self.outcomes, "findings": self.findings}


def fuzz_image_reader(folder: Path) -> dict[str, Any]:
    camp, seeds = Campaign("image reader"), _seeds()
    path = folder / "fuzz.img"

    strategy = st.one_of(
        st.tuples(st.sampled_from(range(len(seeds))),
                  st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=8),
                  st.one_of(st.none(), st.integers(1, 400))),
        st.binary(max_size=512))

    def check(case: Any) -> None:
        camp.tick()
        data = _mutated(seeds[case[0]], case[1], case[2]) if isinstance(case, tuple) else case
        path.write_bytes(data)
        try:
            _, img = read_image_file(str(path))
            arr = canonical(img, 16, 3)
        except BadFile:
            camp.outcome("refused (BadFile)")
            return
        except Exception as err:  # noqa: BLE001 - outside the contract: a finding
            camp.finding(f"{type(err).__name__}: {err}"[:200], data[:64])
            camp.outcome("finding")
            return
        if arr.shape != (16, 16, 3) or arr.dtype != np.uint8:
            camp.finding(f"shape {arr.shape} dtype {arr.dtype}", data[:64])
        camp.outcome("decoded")

    return camp.run(strategy, check)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.lists(st.integers(-3, 300), max_size=4),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in [prefix + (k,), *_paths(v, prefix + (k,))]]
    return []


def fuzz_params(folder: Path) -> dict[str, Any]:
    camp = Campaign("params")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = _paths(base)
    path = folder / "params.yaml"

    strategy = st.one_of(
        st.lists(st.tuples(st.sampled_from(keys), _VALUES), min_size=1, max_size=3),
        st.text(max_size=200))

    def check(case: Any) -> None:
        camp.tick()
        if isinstance(case, str):
            path.write_text(case)
        else:
            raw = copy.deepcopy(base)
            for key, value in case:
                node = raw
                for part in key[:-1]:
                    node = node[part] if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    node[key[-1]] = value
            path.write_text(yaml.safe_dump(raw))
        try:
            load_params(path)
            camp.outcome("accepted")
        except BadInput as err:
            camp.outcome("refused (BadInput)")
            if not str(err).startswith("params"):
                camp.finding(f"message does not name params: {err}"[:200], case)
        except Exception as err:  # noqa: BLE001 - outside the contract: a finding
            camp.finding(f"{type(err).__name__}: {err}"[:200], case)
            camp.outcome("finding")

    return camp.run(strategy, check)


_ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1",
              "cp1252")


def _write_params_file(path: Path, text: str, case: tuple[Any, ...]) -> None:
    """One file-level case at `path` (what the last case left there is removed first)."""
    if path.is_dir():
        shutil.rmtree(path)
    path.unlink(missing_ok=True)
    kind = case[0]
    if kind == "encoding":
        path.write_bytes(text.encode(case[1]))
    elif kind == "bytes":  # raw bytes spliced in at a position
        data = text.encode()
        pos = case[2] % len(data)
        path.write_bytes(data[:pos] + case[1] + data[pos:])
    elif kind == "nesting":
        depth = case[2]
        if case[1] == "block":  # indentation: each level one space deeper
            body = "".join(f"\n{' ' * (i + 1)}a:" for i in range(min(depth, 1400))) + " 1"
        else:
            body = "[" * depth + "]" * depth if case[1] == "[" else "{a: " * depth + "1" + "}" * depth
        path.write_text(f"seed: 0\ndata: {body}\n")
    elif kind == "size":  # padded with a comment: valid YAML, only too large
        path.write_text(text + "#" * case[1] + "\n")
    else:  # a folder, empty or holding a params.yaml
        path.mkdir()
        if case[1]:
            (path / "params.yaml").write_text(text)


def fuzz_params_files(folder: Path) -> dict[str, Any]:
    camp = Campaign("params files")
    # One non-ASCII character, so that every encoding but UTF-8's is also invalid UTF-8.
    text = (REPO / "params.yaml").read_text().replace("- '0'", "- 'caf\u00e9'", 1)
    path = folder / "params-file.yaml"

    strategy = st.one_of(
        st.tuples(st.just("encoding"), st.sampled_from(_ENCODINGS)),
        st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=64), st.integers(0, 10**5)),
        st.tuples(st.just("nesting"), st.sampled_from(("[", "{", "block")), st.integers(1, 200_000)),
        st.tuples(st.just("size"), st.integers(0, 4 * 2**20)),
        st.tuples(st.just("folder"), st.booleans()))

    def check(case: tuple[Any, ...]) -> None:
        camp.tick()
        _write_params_file(path, text, case)
        shown = case if case[0] != "bytes" else (case[0], case[1][:32], case[2])
        try:
            load_params(path)
            camp.outcome(f"{case[0]}: accepted")
        except BadInput as err:
            camp.outcome(f"{case[0]}: refused (BadInput)")
            if not str(err).startswith("params") or "\n" in str(err):
                camp.finding(f"not one line naming params: {err}"[:200], shown)
        except Exception as err:  # noqa: BLE001 - outside the contract: a finding
            camp.finding(f"{type(err).__name__}: {err}"[:200], shown)
            camp.outcome(f"{case[0]}: finding")

    return camp.run(strategy, check)


def main() -> None:
    # Pillow warns about odd TIFF tags on mutated files: expected, and not a finding.
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, fn in (("image_reader", fuzz_image_reader), ("params", fuzz_params),
                         ("params_files", fuzz_params_files)):
            try:
                results[name] = fn(Path(tmp))
            except Exception:  # noqa: BLE001
                results[name] = {"error": traceback.format_exc()[-2000:]}
            r = results[name]
            print(f"fuzz {name}: {r.get('inputs')} inputs in {r.get('seconds')} s, "
                  f"{len(r.get('findings', []))} findings; {r.get('outcomes')}", flush=True)
            for f in r.get("findings", [])[:5]:
                print(f"  finding: {f['what']} <- {f['input'][:120]}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
