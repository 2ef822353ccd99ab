"""Pipeline tasks: small serialisable inputs (ids, paths, config dicts), file outputs; they call ffsplit.

flows -> tasks -> ffsplit: tasks may import MLflow, Prefect or Ray; ffsplit never does.
"""
