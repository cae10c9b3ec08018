"""medops: workflow-orchestrated MLOps for clinical machine learning.

This small core holds what every part shares: the settings object and the `medops` command.
"""
