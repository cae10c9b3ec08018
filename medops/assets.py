"""The Airflow Assets that chain the medops loop, declared once here and imported by every DAG.

Only ``airflow.sdk`` is imported: DAG files stay light to parse.
"""

from __future__ import annotations

from airflow.sdk import Asset

DATA = Asset("medops/data", extra={"doc": "A new data version was tagged in the data registry."})
CHAMPION = Asset("medops/champion", extra={"doc": "A model version was promoted to @champion."})
DRIFT = Asset("medops/drift", extra={"doc": "monitor_drift saw drift in what the service receives."})
