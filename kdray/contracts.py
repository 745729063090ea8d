"""The names the engine, the tracker and the analysis share: MLflow tags, Tune result keys, records.

A run written by one part and read by another meets here, so a name changes in
one place.  Values that must come back typed (a trial's condition) travel as
JSON in one tag, not as strings re-parsed from flattened params.
"""
from __future__ import annotations

import json
from typing import Any, Optional

# MLflow tags ----------------------------------------------------------------
TAG_KIND = "kdray.kind"                 # "sweep" | "trial" | "report"
KIND_SWEEP, KIND_TRIAL, KIND_REPORT = "sweep", "trial", "report"
TAG_TRIAL_KEY = "kdray.trial_key"
TAG_ROLE = "kdray.role"                 # "teacher" | "student"
TAG_SETUP = "kdray.setup"
TAG_METHOD = "kdray.method"             # "teacher" or a condition's name
TAG_TEACHER_KEY = "kdray.teacher_key"
TAG_CONDITION = "kdray.condition"       # JSON {"method", "params", "width"}: typed, for the analysis
TAG_FAILURE = "kdray.failure"           # why a FAILED run failed, one line
TAG_SUSPECT = "kdray.suspect"           # why a FINISHED run's results look like nonsense (kdray/sanity.py)
TAG_RETRIES = "kdray.retries"           # how often Tune restarted the trial (lost worker or node)
TAG_REUSED = "kdray.reused"             # "true": a teacher found in storage, logged, not retrained
TAG_VERSION = "kdray.version"
TAG_GIT_SHA = "kdray.git_sha"
TAG_CHECKPOINT = "kdray.checkpoint_sha256"  # a pretrained teacher's run: the SHA-256 of its state dict
TAG_PLUGINS = "kdray.plugins"           # on the sweep run: the plug-in modules its trials imported
TAG_FINGERPRINT = "kdray.fingerprint"   # the id of what the trial ran on (kdray/provenance.py) ...
TAG_FINGERPRINT_JSON = "kdray.fingerprint_json"   # ... and the fingerprint itself, as JSON
TAG_DATA_SHA = "kdray.data_sha256"      # the data set's tensors as the trial saw them
TAG_PACK = "kdray.pack"                 # a packed student: its pack's id (size and members' keys hashed)
TAG_SWEEP_SHA = "kdray.sweep_sha256"    # the sweep file that launched the run (its SHA-256)
TAG_SIMULATED = "kdray.simulated"       # what the run only simulated (a GPU trial run on a CPU)
TAG_METRICS_STREAMED = "kdray.metrics_streamed"   # why a trial's metrics were streamed, without Procrustes
TAG_PARENT = "mlflow.parentRunId"       # MLflow nests a trial's run under the sweep's
# An experiment tag: MLflow 3's UI opens the experiment in its model-training view (runs, metrics,
# charts) instead of the GenAI "Overview / Traces" page.
TAG_EXPERIMENT_KIND, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

# What a trial reports to the driver through Tune ------------------------------
RESULT_LAST = "kdray"                   # the latest record
RESULT_EPOCHS = "kdray_epochs"          # every record since the last report
RESULT_PACK = "kdray_pack"              # a packed trial: {trial key: {RESULT_EPOCHS: [...]}} per student
# Keys inside a record
EPOCH, FINAL, FAILURE = "epoch", "final", "failure"   # final: 1 on the trial's last record


def trial_tags(spec, parent_id: str, version: str, git_sha: str) -> dict[str, str]:
    """The tags of a trial's MLflow run."""
    tags = {TAG_KIND: KIND_TRIAL, TAG_TRIAL_KEY: spec.trial_key, TAG_ROLE: spec.role, TAG_SETUP: spec.setup,
            TAG_METHOD: spec.method, TAG_TEACHER_KEY: str(spec.teacher_key), TAG_CONDITION: condition_json(spec),
            TAG_VERSION: version, TAG_GIT_SHA: git_sha, TAG_PARENT: parent_id}
    if getattr(spec, "checkpoint_sha256", None):
        tags[TAG_CHECKPOINT] = spec.checkpoint_sha256
    return tags


def provenance_tags(run: dict) -> dict[str, str]:
    """The tags of a trial's run.json (kdray/recipe.py ``run_record``); {} for a trial stored
    before kdray wrote one."""
    if not run:
        return {}
    tags = {TAG_FINGERPRINT: run["fingerprint_id"], TAG_FINGERPRINT_JSON: json.dumps(run["fingerprint"], sort_keys=True),
            TAG_DATA_SHA: run.get("data_sha256") or "unknown"}
    if run["fingerprint"].get("simulated"):
        tags[TAG_SIMULATED] = run["fingerprint"]["simulated"]
    if run.get("metrics_streamed"):
        tags[TAG_METRICS_STREAMED] = run["metrics_streamed"]
    if run.get("pack_keys"):
        import hashlib
        keys = run["pack_keys"]
        tags[TAG_PACK] = f"{len(keys)} students, {hashlib.sha256(','.join(keys).encode()).hexdigest()[:12]}"
    return tags


def condition_json(spec) -> str:
    return json.dumps({"method": spec.method, "params": spec.params, "width": spec.width}, sort_keys=True)


def parse_condition(text: Optional[str]) -> Optional[dict[str, Any]]:
    """The condition tag's value, or None for runs logged before the tag existed."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
