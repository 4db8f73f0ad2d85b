"""MLflow, and only here: a run per stage under a parent per pipeline run, the model registry
and its aliases. Importing this package is cheap: every module imports mlflow (and yaml,
psutil, pydantic) inside the functions that need it, so stages that never track never load it.

Where runs go: MLFLOW_TRACKING_URI when set (a team server), else the SQLite file mlflow.db at
the project root with artifacts in mlartifacts/ beside it. IMAGEPIPE_TRACKING=0 switches
tracking off. Any store failure is TrackingDown (exit 75, naming the URI) after bounded
retries; a run a killed stage left open is ended FAILED by the next session (journal.py).
A stage's run is kept by the tracking agent (remote.py, agent.py), so the stage process itself
never imports mlflow; IMAGEPIPE_TRACKING_AGENT=0, or an agent that cannot start, keeps it
in-process.

| module | its one job |
|---|---|
| store.py | where the store is, reaching it with bounded retries, failures -> TrackingDown |
| declared.py | what dvc.yaml declares for a stage |
| metrics.py | params, metrics, per-epoch series and artifacts out of the declared files |
| grouping.py | which parent run a stage's run belongs under |
| parentrun.py | what the parent run shows: name, all params, experiment name, headline metrics |
| live.py | per-epoch metrics logged while the stage runs (tails stages/core/epochlog.py's file) |
| journal.py | runs left open by a killed stage, closed by the next session |
| stagerun.py | one stage's run: open, fill, register what the body returned, close |
| registration.py | what a stage hands over to register a model version (no MLflow) |
| register.py | logging the models and registering the version, alias challenger |
| serving.py | the pyfunc `mlflow models serve` runs: checks pixels, answers class names |
| remote.py | the stage's side of the tracking agent: a run kept there, mlflow never imported |
| agentcall.py | a command's verb (`imagepipe promote`) run by the agent, else in-process |
| channel.py | reaching an agent: its socket and key, authenticated framing, bounded waits |
| agent.py | the tracking agent: one process per code and tracking environment keeps the runs |
| describe.py | the registered version's one-paragraph description |
| registry.py | the verbs of promote, rollback and lineage |
"""

from stages.core.tracking.registration import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    Parity,
    Registration,
)
from stages.core.tracking.registry import Registry, VersionInfo
from stages.core.tracking.store import Store, tracking_enabled

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS", "Parity", "Registration", "Registry", "Store",
           "VersionInfo", "tracking_enabled"]
