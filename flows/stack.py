"""`python -m flows.stack up|down|status|env`: the local Prefect and MLflow servers and worker.

Every command a user runs is `python -m flows.<name>`; the service manager itself lives in
services/stack.py.
"""

from services.stack import main

if __name__ == "__main__":
    raise SystemExit(main())
