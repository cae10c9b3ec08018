"""The Airflow Assets that chain the medops loop, declared once here and imported by every DAG.

Only light Airflow modules are imported: DAG files stay quick to parse.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetWatcher

from medops.triggers import LandingTrigger

LANDING = Asset(
    "medops/landing",
    watchers=[AssetWatcher(name="medops_landing_folder", trigger=LandingTrigger())],
    extra={"doc": "Files a hospital dropped into MEDOPS_HOME/landing/."},
)
DATA = Asset("medops/data", extra={"doc": "A new data version was tagged in the data registry."})
CHAMPION = Asset("medops/champion", extra={"doc": "A model version was promoted to @champion."})
DRIFT = Asset("medops/drift", extra={"doc": "monitor_drift saw drift in what the service receives."})
