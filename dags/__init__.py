"""The four medops DAGs, one per file. Airflow loads them by path; the package exists for the layer contracts."""
