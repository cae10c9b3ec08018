"""Names of the Airflow Assets that chain the medops loop: plain strings, so that the layers below
orchestration read asset events without importing Airflow (``medops.orchestration`` declares them)."""

LANDING = "medops/landing"
DATA = "medops/data"
CHAMPION = "medops/champion"
DRIFT = "medops/drift"
