"""The core every medops layer stands on: settings, files, processes, asset names, alert channels.
Nothing here imports ``pipelines``, ``serving``, ``monitoring``, ``medops.app`` or Airflow."""
