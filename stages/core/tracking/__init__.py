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

Each module's one job: README, 'Code layout (for contributors)'.
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
