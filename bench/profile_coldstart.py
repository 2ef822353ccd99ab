"""Where the pipeline's profile stage spends its extra seconds (issue 3): one profile task on a
fresh embedded Ray, submitted twice. The first lands on a cold worker (imports torch and
transformers, first model load); the second on the same, now warm, worker. Prints JSON.

    python bench/profile_coldstart.py [--calib-tokens 4096] [--out bench/results/profile_coldstart-cpu-2core.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402

MODEL = "smollm2-135m"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    from ffsplit.config import ProfileConfig
    from tasks.profile import profile_unit
    from tasks.records import BaseModel
    from tasks.runtime import ensure_ray

    imports_s = time.perf_counter() - started
    t = time.perf_counter()
    ensure_ray(num_cpus=args.cpus)
    ray_start_s = time.perf_counter() - t
    base = BaseModel.resolve(MODEL)
    profile = ProfileConfig(tokens=args.calib_tokens).to_dict()
    runs = []
    with tempfile.TemporaryDirectory(prefix="ffsplit-coldstart-") as tmp:
        for i in range(2):
            out = str(Path(tmp) / f"unit-{i}.safetensors")
            t = time.perf_counter()
            record = profile_unit.run(model=base, profile=profile, unit=0, units=1, out=out)
            wall = time.perf_counter() - t
            runs.append(
                {
                    "worker": "cold" if i == 0 else "warm",
                    "wall_s": wall,
                    "in_task_s": record.seconds,
                    "outside_task_s": wall - record.seconds,
                    "threads": record.threads,
                }
            )
    result = {
        "command": " ".join(["python", "bench/profile_coldstart.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "model": MODEL,
        "calib_tokens": args.calib_tokens,
        "driver_imports_s": imports_s,
        "ray_start_s": ray_start_s,
        "runs": runs,
        "cold_minus_warm_s": runs[0]["wall_s"] - runs[1]["wall_s"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
