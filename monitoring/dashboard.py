"""The Evidently dashboard of the served model: each window's verdict, the signals behind it with
their thresholds, sensitivity, and a tab per site.

Every series is a ``MeanValue`` of the ``verdict`` snapshots (:func:`monitoring.reports.
verdict_figures`), picked by its column; thresholds are figures too (line plots draw no
horizontal line). Evidently merges series that differ by tags alone, so a site's figures are
columns of their own, ``<figure>@<site>``. :func:`save_dashboard` writes the dashboard whole,
with ids derived from titles, so writing it again for the same sites leaves it as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from uuid import NAMESPACE_URL, UUID, uuid5

if TYPE_CHECKING:
    from evidently.sdk.models import DashboardModel, DashboardPanelPlot, PanelMetric

SITE_TAB = "Site "
VERDICT_LEGEND = "-1 insufficient data, 0 no drift, 1 data quality, 2 drift, 3 performance drop"
SEVERITY_LEGEND = "0 none, 1 warning, 2 critical"
SENSITIVITY_GATE = ("gate_min_sensitivity", "threshold (gate's minimum sensitivity)")
P_VALUE_THRESHOLD = ("threshold_prediction_drift_p_value", "threshold (p-value: drift at or below)")


def site_figure(name: str, site: str) -> str:
    return f"{name}@{site}"


def _series(*columns: tuple[str, str]) -> list[PanelMetric]:
    from evidently.sdk.models import PanelMetric

    return [
        PanelMetric(legend=legend, metric="MeanValue", metric_labels={"column": column}, tags=["verdict"])
        for column, legend in columns
    ]


def panels(sites: Iterable[str]) -> list[tuple[str, DashboardPanelPlot]]:
    """Every panel with its tab: verdict, signals, sensitivity, then one tab per site."""
    from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel

    def line(tab: str, title: str, *columns: tuple[str, str], size: str = "half") -> tuple[str, DashboardPanelPlot]:
        return tab, line_plot_panel(title, _series(*columns), size=size)

    found = [
        (
            "Verdict",
            counter_panel(
                "Latest verdict and severity",
                _series(
                    ("verdict_code", "verdict"), ("severity_code", "severity"), ("sites_alerting", "sites alerting")
                ),
                description=f"verdict: {VERDICT_LEGEND}; severity: {SEVERITY_LEGEND}",
            ),
        ),
        (
            "Verdict",
            bar_plot_panel(
                f"Verdict per window ({VERDICT_LEGEND})",
                _series(("verdict_code", "verdict code"), ("severity_code", f"severity ({SEVERITY_LEGEND})")),
            ),
        ),
        line(
            "Signals",
            "Prediction drift: KS p-value of probability_malignant",
            ("prediction_drift_p_value", "p-value"),
            P_VALUE_THRESHOLD,
        ),
        line(
            "Signals",
            "Share of the model's weight in drifted features",
            ("importance_weighted_share", "weighted share"),
            ("threshold_importance_share", "threshold (weighted share: drift at or above)"),
        ),
        line(
            "Signals",
            "Share of features drifted materially",
            ("column_share", "share"),
            ("threshold_column_share", "threshold (share: drift at or above)"),
        ),
        line(
            "Signals",
            "Highest refusal rate of a site",
            ("max_site_refusal_rate", "refusal rate"),
            ("threshold_refusal_critical_rate", "threshold (refusal rate: critical at or above)"),
        ),
        line(
            "Sensitivity",
            "Sensitivity: estimated (CBPE, 95 % interval) and realized (feedback labels)",
            ("estimated_sensitivity", "estimated"),
            ("estimated_sensitivity_low", "estimated, 95 % low"),
            ("estimated_sensitivity_high", "estimated, 95 % high"),
            ("realized_sensitivity", "realized"),
            SENSITIVITY_GATE,
            size="full",
        ),
    ]
    for site in sorted(set(sites)):
        tab = f"{SITE_TAB}{site}"
        found += [
            line(
                tab,
                f"{site}: prediction drift p-value",
                (site_figure("prediction_drift_p_value", site), "p-value"),
                P_VALUE_THRESHOLD,
            ),
            line(
                tab,
                f"{site}: refusal rate",
                (site_figure("refusal_rate", site), "refusal rate"),
                (site_figure("refusal_rate_threshold", site), "threshold (site's baseline bound + jump)"),
            ),
            line(
                tab,
                f"{site}: estimated sensitivity",
                (site_figure("estimated_sensitivity", site), "estimated"),
                SENSITIVITY_GATE,
                size="full",
            ),
        ]
    return found


def _stable_id(title: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"medops-dashboard/{title}")


def dashboard_model(sites: Iterable[str]) -> DashboardModel:
    """The whole dashboard for ``sites``, tabs and panels with ids that depend on their titles only."""
    from evidently.sdk.models import DashboardModel, DashboardTabModel

    tabs: dict[str, DashboardTabModel] = {}
    plots = []
    for tab, panel in panels(sites):
        panel.id = _stable_id(f"{tab}/{panel.title}")
        tabs.setdefault(tab, DashboardTabModel(id=_stable_id(tab), title=tab, panels=[])).panels.append(panel.id)
        plots.append(panel)
    return DashboardModel(tabs=list(tabs.values()), panels=plots)


def save_dashboard(workspace: Any, project_id: Any, sites: Iterable[str]) -> DashboardModel:
    """Write the project's dashboard for ``sites`` and every site it already has a tab for."""
    seen = {
        tab.title.removeprefix(SITE_TAB)
        for tab in workspace.get_dashboard(project_id).tabs
        if tab.title and tab.title.startswith(SITE_TAB)
    }
    model = dashboard_model(seen | set(sites))
    workspace.save_dashboard(project_id, model)
    return model
