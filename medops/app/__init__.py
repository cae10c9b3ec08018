"""The composition root: the ``medops`` command, ``medops up``/``down`` and the drift scenario.

It wires ``serving``, ``monitoring`` and ``pipelines`` together for people at a terminal; the
DAGs call the same functions.
"""
