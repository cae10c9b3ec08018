"""Monitoring: drift of what the service receives (Evidently) and performance from feedback labels.

Alerts go out through :mod:`medops.core.alerts`. Submodules pull in pandas, scipy and Evidently,
so they are imported where they are used.
"""
