"""`python -m flows.deploy`: create the flows' Prefect deployments (services/deploy.py)."""

from services.deploy import main

if __name__ == "__main__":
    raise SystemExit(main())
