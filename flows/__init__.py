"""Prefect flows: `compress` (one model, one recipe, one registered variant), `sweep` (a grid of
methods x heavy ratios x budgets plus baselines), `observation`, `results` and `cache`.

Every command a user runs is `python -m flows.<name>`, the local services (`flows.stack`) and the
deployments (`flows.deploy`) included, whose code lives in services/. The pipeline stages the
flows run are in tasks/, MLflow in tracking/, the results page and charts in reports/.
"""
