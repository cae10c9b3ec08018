"""The composition root: the ``medops`` command, ``medops up``/``down`` and the drift scenario,
wiring ``serving``, ``monitoring`` and ``pipelines`` together for people at a terminal."""
