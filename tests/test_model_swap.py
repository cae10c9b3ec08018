"""A model swapped out of a serving worker is freed, even after shap explained it.

The worker freezes its heap (``gc.freeze``) after every swap so that full collections stop landing
on requests, and frozen objects are never collected. A non-linear model that answered ``/explain``
is in a reference cycle (its shap explainer holds the model's scoring method), so only a collection
can free it once swapped out. Measured before the fix: every swapped-out model stayed alive.

Run in a fresh interpreter: shap's first import matters (it keeps tracebacks of the optional
imports it lacks, which would pin whichever model first imported it), and the test process has
frozen its own heap and imported shap already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SWAPS = textwrap.dedent(
    """
    import copy, gc, json, sys, weakref

    import numpy as np
    from serving_fixtures import fit_tiny_model, records
    from sklearn.ensemble import HistGradientBoostingClassifier

    import serving.service as service
    from pipelines.schema import FEATURES
    from serving.scoring import ServingModel

    assert "shap" not in sys.modules
    boosted = fit_tiny_model(classifier=HistGradientBoostingClassifier(max_iter=20, random_state=0))
    X = np.array([[row[name] for name in FEATURES] for row in records(1)])

    def model(version):
        return ServingModel.from_estimator("breast_cancer_diagnosis", version, copy.deepcopy(boosted))

    # the premise: an explained non-linear model is kept by a cycle, which a collection frees
    gc.disable()
    probe = model("0")
    assert not probe.is_fast
    probe.explain(X)  # the first explanation in this process: it imports shap
    probe_ref = weakref.ref(probe)
    del probe
    in_cycle = probe_ref() is not None
    gc.collect()
    probe_freed = probe_ref() is None
    gc.enable()

    # a worker's life: start, then swaps, each model explaining while it serves
    service.STATE.model = model("1")
    service._freeze_heap()  # what MedopsService.__init__ does after loading its model
    served = []
    for version in ("1", "2", "3"):
        if version != "1":
            service.STATE.swap(model(version))  # what the control-file watcher's _switch does
        current = service.STATE.model
        assert current.version == version and current.explain(X).method == "shap-permutation"
        served.append((version, weakref.ref(current), weakref.ref(current.estimator)))
        del current
    service.STATE.swap(model("4"))
    print(json.dumps({
        "in_cycle": in_cycle,
        "probe_freed": probe_freed,
        "frozen": gc.get_freeze_count(),
        "alive": [version for version, model, estimator in served if model() is not None],
        "estimators_alive": [version for version, model, estimator in served if estimator() is not None],
    }))
    """
)


def test_swapped_out_models_are_freed_after_explaining(tmp_path: Path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "MEDOPS_HOME": str(tmp_path / "medops-home"),
        "MEDOPS_SERVING_MODEL_VERSION": "1",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    done = subprocess.run(
        [sys.executable, "-c", SWAPS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["in_cycle"], "an explained model is not in a reference cycle: this test would prove nothing"
    assert result["probe_freed"], "the first model to import shap stays alive"
    assert result["frozen"] > 0, "the worker no longer freezes its heap: this test would prove nothing"
    assert result["alive"] == [], f"swapped-out models kept alive: versions {result['alive']}"
    assert result["estimators_alive"] == []
