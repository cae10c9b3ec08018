"""Data, training, evaluation and registry steps of medops: pure functions the DAGs and the CLI call."""
