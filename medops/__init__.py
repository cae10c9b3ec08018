"""medops: workflow-orchestrated MLOps for clinical machine learning.

Two layers live here, at the two ends of the house (see "Layers" in README.md):

- :mod:`medops.core` is the floor every other package stands on: settings, file and process
  helpers, asset names and the alert channels. It imports no other medops package.
- :mod:`medops.app` is the composition root: the ``medops`` command, ``medops up``/``down`` and
  the drift scenario. It may import everything below it.

:mod:`medops.orchestration` is the one module outside ``dags/`` that imports Airflow.
"""
