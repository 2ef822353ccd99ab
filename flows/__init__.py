"""Prefect flows: `compress` (one model, one recipe, one registered variant) and `sweep` (a grid of
methods x heavy ratios x budgets plus baselines), their deployments (flows/deploy.py) and the local
services they run against (flows/stack.py).

Kept free of imports so `python -m flows.stack` starts quickly; the stages shared by both flows live
in flows/compress.py.
"""
