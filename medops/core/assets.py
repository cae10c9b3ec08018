"""Names of the Airflow Assets that chain the medops loop.

Plain strings, so that the layers below orchestration (the retraining plan, the rollout) can read
asset events without importing Airflow; ``medops.orchestration`` declares the Asset objects.
"""

LANDING = "medops/landing"
DATA = "medops/data"
CHAMPION = "medops/champion"
DRIFT = "medops/drift"
