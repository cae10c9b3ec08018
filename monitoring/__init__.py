"""Monitoring: drift of what the service receives (Evidently), performance from feedback, alerts.

Submodules are imported where they are used: :mod:`monitoring.alerts` is light (stdlib and
``airflow.sdk`` only) so DAG files can import its notifier at parse time; :mod:`monitoring.drift`
and :mod:`monitoring.reports` pull in pandas, scipy and Evidently.
"""
