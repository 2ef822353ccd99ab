"""The library's jobs, path in and path out: profile, compress, heal, evaluate, observe.

These are what the CLI commands and the pipeline's tasks call, so that `ffsplit compress ...` and a
Prefect/Ray run do the same work (and the pipeline's overhead can be measured against them).
"""

from ffsplit.jobs.common import Progress, calibration_data, is_variant, load_any, run_environment
from ffsplit.jobs.compress import compress_job
from ffsplit.jobs.evaluate import evaluate_job, latency_against_base, size_of
from ffsplit.jobs.heal import heal_job, heal_model
from ffsplit.jobs.observation import (
    OBSERVATION_CORPORA,
    OBSERVATION_DEFAULTS,
    OBSERVATION_HEAVY_RATIO,
    OBSERVATION_HELP,
    OBSERVATION_STABILITY_RATIOS,
    observation_job,
    observation_params,
)
from ffsplit.jobs.profile import profile_job

__all__ = [
    "OBSERVATION_CORPORA",
    "OBSERVATION_DEFAULTS",
    "OBSERVATION_HEAVY_RATIO",
    "OBSERVATION_HELP",
    "OBSERVATION_STABILITY_RATIOS",
    "Progress",
    "calibration_data",
    "compress_job",
    "evaluate_job",
    "heal_job",
    "heal_model",
    "is_variant",
    "latency_against_base",
    "load_any",
    "observation_job",
    "observation_params",
    "profile_job",
    "run_environment",
    "size_of",
]
