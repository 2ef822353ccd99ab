"""The `observation` flow (issue 6): the paper's premise measured per base model and logged in MLflow.

Per model: ffsplit.jobs.observation_job on Ray (tasks.observation.observe: heavy-hitter
concentration, hit frequency, heavy-set stability between Wikipedia and news, the top-1% against
random-1% ablation), written with its plots into RUN_DIR/<model>/, then logged as one MLflow run
in the experiment 'ffsplit/<model>' with ffsplit.role=observation (tasks.observation.log_observation).
With `record`, the flow computes nothing and logs existing record folders (e.g. those that
bench/observation.py wrote). Everything is checked before any work: model names, settings,
record folders, the Prefect API and the MLflow store (MLFLOW_TRACKING_URI, else the local stack).
The results page (`python -m flows.results`) shows the latest complete observation run per model.

CLI: ``python -m flows.observation run --models smollm2-135m minilm-l6 [--calib-tokens 8192 ...]``
computes and logs; ``python -m flows.observation log --record bench/results/observation/<model>
[...]`` logs record folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from ffsplit.errors import FFSplitError
from ffsplit.jobs import OBSERVATION_DEFAULTS, OBSERVATION_HELP, observation_params
from flows.run import (
    check_services,
    provenance_tags,
    resolve_base,
    run_folder,
    write_json,
)
from tasks.runtime import check_prefect_api, ray_session

DEFAULT_MODELS = ["smollm2-135m", "gemma3-270m", "minilm-l6"]  # issue 6
TASK_RUNNER_THREADS = 8


def _model_names(models: Any) -> list[str]:
    if isinstance(models, str):
        models = [m for m in models.split(",") if m]
    if (
        not isinstance(models, list | tuple)
        or not models
        or not all(isinstance(m, str) and m.strip() for m in models)
    ):
        raise FFSplitError(
            f"models must be a non-empty list of packaged model names or folders, got {models!r}"
        )
    return list(dict.fromkeys(models))


def _record_dirs(record: Any) -> list[str]:
    if isinstance(record, str | Path):
        record = [record]
    if not isinstance(record, list | tuple) or not record:
        raise FFSplitError(f"record must be a record folder or a list of them, got {record!r}")
    return [str(Path(r)) for r in record]


def _provenance(folder: Path | None) -> dict[str, str]:
    """Run folder, rerun command and flow run id (flows.run.provenance_tags)."""
    tags = provenance_tags("observation", folder or Path("."))
    if folder is None:
        tags.pop("ffsplit.run_dir", None)
    return {**tags, "ffsplit.flow": "observation"}


def _slug(name: str) -> str:
    from reports.results import slug

    return slug(Path(name).name if Path(name).is_dir() else name)


def _log_records(record: Any) -> dict[str, Any]:
    """Log existing record folders (e.g. bench/observation.py's) as MLflow runs, computing nothing."""
    from tasks.observation import read_record
    from tracking.observation import log_observation_task

    folders = _record_dirs(record)
    records = [read_record(f) for f in folders]  # missing keys: one line, file and key
    services = check_services(True)
    tags = _provenance(None)
    logged = []
    for folder, rec in zip(folders, records, strict=True):
        result = log_observation_task.with_options(
            task_run_name=f"log-{_slug(rec['model']['name'])}"
        ).submit(folder, {**tags, "ffsplit.record_dir": str(Path(folder).resolve())})
        logged.append({"record_dir": folder, **result.result()})
    for item in logged:
        print(
            f"{item['model']}: run {item['run_id']} (experiment {item['experiment_id']})"
            + (", already logged" if item["reused"] else "")
        )
    return {"flow": "observation", "logged": logged, "services": services}


@flow(
    name="observation",
    task_runner=ThreadPoolTaskRunner(max_workers=TASK_RUNNER_THREADS),
    log_prints=True,
)
def observation(
    models: list[str] | None = None,
    calib_tokens: int = 8192,
    eval_tokens: int = 8192,
    window: int = 512,
    batch_size: int = 4,
    probe_limit: int = 1500,
    random_repeats: int = 3,
    seed: int = 0,
    record: list[str] | str | None = None,
    run_dir: str | None = None,
    ray_cpus: int | None = None,
) -> dict[str, Any]:
    """Measure the paper's premise on each model and log one MLflow run per model; with `record`
    (one record folder or a list), log those folders instead of computing.

    models: packaged names or HF folders (default smollm2-135m, gemma3-270m, minilm-l6);
    calib_tokens of Wikipedia and of news calibration text, eval_tokens of Wikipedia evaluation
    text (perplexity; the hidden-state error for encoders), probe_limit tweets per probe split
    (encoders), random_repeats random 1% sets, all in windows of `window` tokens.
    """
    started = time.perf_counter()
    # ---- validation: everything before any work
    from tasks.observation import observe
    from tracking.observation import log_observation_task

    if record is not None:
        if models:
            raise FFSplitError(
                "give models (compute and log) or record (log existing record folders), not both"
            )
        return _log_records(record)

    names = _model_names(DEFAULT_MODELS if models is None else models)
    params = observation_params(
        calib_tokens, eval_tokens, window, batch_size, probe_limit, random_repeats, seed
    )
    bases = [resolve_base(name) for name in names]  # unknown model: one line, before any work
    services = check_services(True)
    folder = run_folder(run_dir, "observation")
    tags = _provenance(folder)
    command = tags["ffsplit.command"]
    print(f"observation of {', '.join(b.name for b in bases)}; run folder {folder}")
    with ray_session(num_cpus=ray_cpus) as cluster:
        futures = [
            observe.task.with_options(task_run_name=f"observe-{_slug(b.name)}").submit(
                model=b.name,
                model_sha256=b.sha256,
                params=params,
                out=str(folder / _slug(b.name)),
                command=command,
            )
            for b in bases
        ]
        computed = [f.result() for f in futures]
    logged = []
    for item in computed:
        result = log_observation_task.with_options(task_run_name=f"log-{_slug(item.model)}").submit(
            item.path, tags
        )
        logged.append({**item.to_dict(), "record_dir": item.path, **result.result()})
    for item in logged:
        print(
            f"{item['model']}: mean top-1% share {100 * item['top1_share']:.1f}%; ablation "
            f"{item['ablation']['metric']}: dense {item['ablation']['dense']:.4g}, top 1% zeroed "
            f"{item['ablation']['top']:.4g}, random 1% {item['ablation']['random_mean']:.4g}; "
            f"MLflow run {item['run_id']}" + (" (cached record)" if item["cached"] else "")
        )
    results = {
        "flow": "observation",
        "models": names,
        "settings": params,
        "logged": logged,
        "run_dir": str(folder),
        "cluster": cluster,
        "services": services,
        "seconds": time.perf_counter() - started,
    }
    write_json(folder / "results.json", results)
    return results


# -------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.observation run ...` or `log --record DIR ...`; errors in one line, exit 2."""
    parser = argparse.ArgumentParser(prog="python -m flows.observation")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="compute the observation (Ray) and log it in MLflow")
    run.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    for name, default in OBSERVATION_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        run.add_argument(flag, type=int, default=default, help=OBSERVATION_HELP.get(name))
    run.add_argument("--run-dir", default=None)
    log = sub.add_parser("log", help="log existing record folders (observation.json + plots)")
    log.add_argument("--record", nargs="+", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        check_prefect_api()
        if args.command == "log":
            result = observation(record=[str(r) for r in args.record])
        else:
            result = observation(
                models=[m for v in args.models for m in v.split(",") if m],
                **{name: getattr(args, name) for name in OBSERVATION_DEFAULTS},
                run_dir=args.run_dir,
            )
    except FFSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([{k: v for k, v in i.items() if k != "ablation"} for i in result["logged"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
