"""medops: workflow-orchestrated MLOps for clinical machine learning.

Two layers live here (see "Layers" in README.md): :mod:`medops.core`, the floor every other package
stands on, and :mod:`medops.app`, the composition root; :mod:`medops.orchestration` is the one
module outside ``dags/`` that imports Airflow.
"""
