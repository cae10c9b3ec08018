"""Serving: the BentoML service, its rollout (build, start, smoke test, switch, roll back) and a typed client.

Nothing is imported here: ``serving.service`` needs a model version when imported, and the DAG and
the command line import ``serving.rollout`` without BentoML's or scikit-learn's import cost.
"""
