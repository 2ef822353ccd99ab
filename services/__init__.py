"""The local services the flows run against (stack: Prefect and MLflow servers, a Prefect worker)
and the flows' Prefect deployments (deploy)."""
