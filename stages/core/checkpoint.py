"""Training checkpoints: everything a killed run needs to go on as if it had never stopped.

One file per training run (checkpoints/<stage>/<run>.pt), replaced atomically each time, holds:
model, optimizer, scheduler and grad-scaler states; the torch and CUDA RNG states (`capture_rng`);
the position (epoch, steps done in it, the epoch's running totals); the history of
finished epochs; and the fingerprint it was made under: params, input hashes, world size and the
digests of the code files the stage runs (stages/core/codeid.py).

Several training processes (stages/core/distributed.py): the root writes the file; it holds
every rank's RNG states and running totals (`ranks`), and the root reads it and sends it to
the others, so machines without the file resume too. The world size is in the fingerprint.

A checkpoint is resumed only when its fingerprint equals the current one: one made under other
params would silently mix two experiments, and one made by other code would ship the old code's
weights under the new code's name (a "complete" checkpoint trains nothing). Then the run starts
fresh and the log says which code files or keys differ. Loading uses
torch.load(weights_only=True): the file holds only tensors and plain containers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stages.core.distributed import SINGLE, Comm
from stages.core.flat import differences
from stages.core.io import save_torch

log = logging.getLogger("imagepipe.checkpoint")


@dataclass
class Position:
    """Where training stands: `step` batches of `epoch` are done (0-based epoch)."""

    epoch: int = 0
    step: int = 0
    # Running sums of the unfinished epoch, so its logged row is the same after a resume.
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


def capture_rng() -> dict[str, Any]:
    """The generators training draws from: torch's and CUDA's (initial weights, dropout). The
    data order and the online augmentation come from numpy Generators seeded per epoch
    (devicedata.py, stream.py); nothing in training uses Python's or numpy's global ones."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["cuda"]
    if saved and torch.cuda.is_available():
        # The devices this process sees now, not those it saw then: a resume with another
        # CUDA_VISIBLE_DEVICES failed with "invalid device ordinal" under set_rng_state_all.
        seen = torch.cuda.device_count()
        for index, rng in enumerate(saved[:seen]):
            torch.cuda.set_rng_state(rng, index)
        if len(saved) != seen:
            log.info("the checkpoint holds the RNG states of %d GPU(s), %d are visible: restored "
                     "%d", len(saved), seen, min(len(saved), seen))


class CheckpointStore:
    """Save and resume one training run; `fingerprint` is what must match to resume."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], comm: Comm = SINGLE) -> None:
        self.path = Path(path)
        self.comm = comm
        # Round-trip through JSON so tuples and lists compare equal to what a file holds.
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))

    def save(self, objects: dict[str, Any], position: Position, history: list[dict[str, Any]]
             ) -> None:
        """Write the checkpoint (every rank calls this; the root writes)."""
        ranks = self.comm.gather({"rng": capture_rng(), "position": asdict(position)})
        if ranks is None:
            return
        payload = {
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "state": {name: obj.state_dict() for name, obj in objects.items()},
            "rng": ranks[0]["rng"],
            "position": ranks[0]["position"],
            "ranks": ranks[1:],  # the other ranks' (empty in one process)
            "history": json.dumps(history),
        }
        save_torch(payload, self.path)

    def resume(self, objects: dict[str, Any]) -> tuple[Position, list[dict[str, Any]]] | None:
        """Load the states into `objects` and restore the RNGs; return the position and the
        history of finished epochs, or None: start fresh."""
        raw = self.comm.broadcast(self._read() if self.comm.is_main else None)
        if raw is None:
            return None
        for name, obj in objects.items():
            obj.load_state_dict(raw["state"][name])
        mine = raw if self.comm.rank == 0 else raw["ranks"][self.comm.rank - 1]
        restore_rng(mine["rng"])
        pos = Position(**mine["position"])
        log.info("resuming from %s: epoch %d, step %d", self.path, pos.epoch + 1, pos.step)
        return pos, json.loads(raw["history"])

    def _read(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
            stored = json.loads(raw["fingerprint"])
        except Exception as err:  # noqa: BLE001 - any unreadable file means the same: start over
            log.warning("not resuming %s: unreadable (%s: %s); starting fresh", self.path,
                        type(err).__name__, err)
            return None
        if stored != self.fingerprint:  # its code included: a new layout is new code
            log.warning("not resuming %s: %s; starting fresh", self.path,
                        why_not(stored, self.fingerprint))
            return None
        return raw


def why_not(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """What differs between a checkpoint's fingerprint and the current one, in one line: the
    code files that changed by name, then the first params or inputs that did."""
    old_code, new_code = stored.get("code") or {}, current.get("code") or {}
    files = sorted(f for f in set(old_code) | set(new_code) if old_code.get(f) != new_code.get(f))
    diff = differences({k: v for k, v in stored.items() if k != "code"},
                       {k: v for k, v in current.items() if k != "code"})
    parts = []
    if files:
        parts.append("it was made by other code (" + ", ".join(files[:5])
                     + (f" and {len(files) - 5} more" if len(files) > 5 else "") + " differ)")
    if diff:
        parts.append("under other params or data (" + "; ".join(diff[:5])
                     + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "") + ")")
    return " and ".join(parts)
