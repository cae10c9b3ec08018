"""The model card of a model version, in Markdown and HTML, built from what was stored about it.

Everything in the card is read back from the registry, the run, the gate's stored decision, the
data registry and the audit trail, never recomputed. :func:`publish` logs it to the version's run
(``model_card/``) and its description; ``serving/bento_build.py`` copies it into the Bento so the
service answers ``GET /model-card`` without MLflow. The HTML is rendered by markdown-it-py (in the
lock through rich) with raw HTML disabled, so text from tags or reasons cannot inject markup.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medops.core.settings import Settings
from pipelines import governance, model_registry
from pipelines.gate import GateDecision, interval_text

CARD_DIR = "model_card"
CARD_MARKDOWN = f"{CARD_DIR}/model_card.md"
CARD_HTML = f"{CARD_DIR}/model_card.html"
DESCRIPTION_CHARS = 4500  # MLflow keeps 5000 characters of a version's description on PostgreSQL
DECISION_ACTIONS = ("gate_decision", "approval", "refusal", "promotion", "deployment", "rollback", "override")


@dataclass(frozen=True)
class ModelCard:
    version: str
    run_id: str
    markdown: str
    html: str


def build(version: str, settings: Settings) -> ModelCard:
    """The card of ``version`` from the registry, its run, its stored decision and the audit trail."""
    from pipelines.train import stored_decision

    client = model_registry.client(settings)
    model_version = client.get_model_version(settings.model_name, str(version))
    run = client.get_run(model_version.run_id)
    markdown = render(
        settings.model_name,
        str(version),
        model_version.run_id,
        version_tags=dict(model_version.tags),
        run_tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        decision=stored_decision(model_version.run_id, settings),
        data_versions=data_versions(run.data.tags.get("data_versions_seen", ""), settings),
        decisions=[entry.model_dump() for entry in governance.entries_about(str(version), settings, DECISION_ACTIONS)],
    )
    return ModelCard(str(version), model_version.run_id, markdown, to_html(markdown, f"Model card: v{version}"))


def publish(version: str, settings: Settings) -> ModelCard:
    """Build the card and log it to the version's run (Markdown and HTML) and description."""
    card = build(version, settings)
    client = model_registry.client(settings)
    client.log_text(card.run_id, card.markdown, CARD_MARKDOWN)
    client.log_text(card.run_id, card.html, CARD_HTML)
    description = card.markdown
    if len(description) > DESCRIPTION_CHARS:
        description = description[:DESCRIPTION_CHARS] + f"\n\n… the whole card: runs:/{card.run_id}/{CARD_MARKDOWN}\n"
    client.update_model_version(settings.model_name, str(version), description=description)
    return card


def stored_card(version: str, settings: Settings) -> tuple[str, str] | None:
    """(Markdown, HTML) of the card logged to the version's run, or None when it has none."""
    import mlflow.artifacts

    client = model_registry.client(settings)  # also points mlflow.artifacts at the medops store
    run_id = client.get_model_version(settings.model_name, str(version)).run_id
    if not run_id:
        return None
    logged = {item.path for item in client.list_artifacts(run_id, CARD_DIR)}
    if not {CARD_MARKDOWN, CARD_HTML} <= logged:
        return None
    stored = f"runs:/{run_id}/"
    return mlflow.artifacts.load_text(stored + CARD_MARKDOWN), mlflow.artifacts.load_text(stored + CARD_HTML)


def to_html(markdown: str, title: str) -> str:
    """A standalone HTML page of the Markdown (CommonMark and tables, raw HTML escaped)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}"
        "code{background:#f4f4f4}</style>\n</head>\n<body>\n"
        f"{body}</body>\n</html>\n"
    )


def data_versions(seen: str, settings: Settings) -> list[dict[str, Any]]:
    """Tag, DVC hash, rows and commit of each data version in a comma-separated list."""
    from pipelines import data_registry

    rows = []
    for tag in [tag for tag in seen.split(",") if tag]:
        try:
            rows.append(data_registry.version_info(tag, settings))
        except (RuntimeError, ValueError, OSError):  # the registry is elsewhere: name the version only
            rows.append({"tag": tag, "dvc_md5": "?", "rows": "?", "commit": "?"})
    return rows


# rendering --------------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: no pipes or line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _status(status: str) -> str:
    return {"passed": "passed", "failed": "**FAILED**", "not_enough_evidence": "not enough evidence"}[status]


def _figures_table(decision: GateDecision) -> list[str]:
    lines = [
        "| rows judged | hold-out rows | malignant | sensitivity [95 % CI] | specificity [95 % CI] "
        "| ROC AUC [95 % CI] | status |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scope, group in [("overall", decision.overall), *decision.sites.items()]:
        figures = group.candidate
        lines.append(
            f"| {_cell(scope)} | {group.rows} | {group.malignant} | {interval_text(figures.sensitivity)} "
            f"| {interval_text(figures.specificity)} | {interval_text(figures.roc_auc, 4)} | {_status(group.status)} |"
        )
    return lines


def _champion_lines(decision: GateDecision) -> list[str]:
    if decision.champion_version is None:
        return ["No champion to compare with: this is the first model judged on these rows."]
    lines = [f"Compared with champion v{decision.champion_version} on the same hold-out rows:", ""]
    lines += ["| rows | champion sensitivity | champion specificity | AUC candidate − champion [95 % CI] |"]
    lines += ["| --- | --- | --- | --- |"]
    for scope, group in [("overall", decision.overall), *decision.sites.items()]:
        theirs, difference = group.champion, group.auc_difference
        diff_text = "n/a"
        if difference is not None:
            diff_text = f"{difference.value:+.4f} [{difference.lower:+.4f}, {difference.upper:+.4f}]"
        lines.append(
            f"| {_cell(scope)} | {interval_text(theirs.sensitivity) if theirs else 'n/a'} "
            f"| {interval_text(theirs.specificity) if theirs else 'n/a'} | {diff_text} |"
        )
    return lines


def render(
    model_name: str,
    version: str,
    run_id: str,
    *,
    version_tags: Mapping[str, str],
    run_tags: Mapping[str, str],
    params: Mapping[str, str],
    metrics: Mapping[str, float],
    decision: GateDecision | None,
    data_versions: list[dict[str, Any]],
    decisions: list[dict[str, Any]],
) -> str:
    """The card's Markdown from stored facts (pure: the tests call it with hand-made facts)."""
    family = params.get("family") or version_tags.get("family", "?")
    threshold = float(params.get("threshold") or version_tags.get("threshold") or "nan")
    target = params.get("sensitivity_target", "?")
    share = params.get("holdout_share", "?")
    data_version = run_tags.get("data_version") or version_tags.get("data_version", "?")
    sites = sorted(decision.sites) if decision is not None else []
    thin = [site for site in sites if decision is not None and decision.sites[site].status == "not_enough_evidence"]
    verdict = "no gate decision stored"
    if decision is not None:
        verdict = (
            f"{'PASSED' if decision.passed else 'FAILED'} under modification protocol v{decision.protocol_version} "
            f"(sha256 `{decision.protocol_sha256[:12]}`)"
        )

    def point(name: str, digits: int = 3) -> str:
        value = metrics.get(name)
        return "n/a" if value is None else f"{value:.{digits}f}"

    out = [
        f"# Model card: {model_name} v{version}",
        "",
        "| | |",
        "| --- | --- |",
        f"| model | {_cell(family)}, registry version {version}, MLflow run `{run_id}` |",
        f"| trained on | data version `{_cell(data_version)}` (DVC `{_cell(run_tags.get('data_dvc_md5', '?'))}`), "
        f"code `{_cell(run_tags.get('code_git_sha', '?')[:12])}`, trigger {_cell(run_tags.get('trigger', '?'))}, "
        f"Airflow run `{_cell(run_tags.get('airflow_run_id') or '-')}` |",
        f"| gate | {verdict} |",
        f"| operating threshold | P(malignant) ≥ {threshold:.4f} |",
        "",
        "## Intended use",
        "",
        "Decision support for clinicians classifying breast masses as malignant or benign from the 30 "
        "features of a fine-needle aspirate (FNA) image analysis (radius, texture, perimeter, area, "
        "smoothness, compactness, concavity, concave points, symmetry, fractal dimension: mean, error "
        "and worst). Every output is reviewed by a clinician together with the rest of the case.",
        "",
        "## Out-of-scope use",
        "",
        "- A diagnosis on its own, or ruling out cancer without a clinician's review.",
        "- Images, other tumour types or organs, or features measured by another method or in other "
        "units (inputs outside plausible ranges are refused with 422).",
        "- Screening populations: the training data's malignant share is far above screening prevalence, "
        "so positive predictive value there would be much lower than below.",
        "- Sites whose hold-out figures below are *not enough evidence*, or sites not listed at all, "
        "until monitoring and feedback show how the model does there.",
        "",
        "## Training data",
        "",
        "| data version | DVC hash | rows | registry commit |",
        "| --- | --- | --- | --- |",
        *[
            f"| `{_cell(row['tag'])}` | `{_cell(row['dvc_md5'])}` | {row['rows']} "
            f"| `{_cell(str(row['commit'])[:12])}` |"
            for row in data_versions
        ],
        "",
        f"Trained on {params.get('train_rows', '?')} rows of `{_cell(data_version)}`. Hold-out: "
        f"{version_tags.get('holdout_rows') or run_tags.get('holdout_rows', '?')} rows "
        f"({version_tags.get('holdout_malignant') or run_tags.get('holdout_malignant', '?')} malignant), each row "
        f"assigned by the SHA-256 of its own content (share {share}), so a row held out once stays held out "
        "in every later data version; fingerprint "
        f"`{_cell(version_tags.get('holdout_sha256') or run_tags.get('holdout_sha256', '?'))}`. "
        "The exact rows are stored with the run under `reference/` (restore them with "
        f"`medops lineage --version {version} --restore DIR`).",
        "",
        "## Metrics on the hold-out (malignant positive, 95 % intervals)",
        "",
    ]
    if decision is not None:
        thresholds = decision.thresholds
        out += _figures_table(decision)
        out += [
            "",
            f"Sensitivity and specificity: {thresholds.interval.title()} intervals; ROC AUC: DeLong. A site is "
            f"judged on its own once it has {thresholds.site_min_positives} malignant (for sensitivity) or "
            f"{thresholds.site_min_negatives} benign (for specificity) hold-out rows; smaller sites are "
            "*not enough evidence*, never passed silently.",
            "",
            *_champion_lines(decision),
        ]
    else:
        out.append("This version's run stored no gate decision.")
    out += [
        "",
        f"Point estimates on all hold-out rows: PPV {point('ppv')}, NPV {point('npv')}, F1 {point('f1')}, "
        f"Brier {point('brier', 4)}.",
        "",
        "## Operating threshold and why",
        "",
        f"P(malignant) ≥ {threshold:.4f} says *malignant*. It is the highest threshold whose out-of-fold "
        f"sensitivity on the training rows reaches {target}: a missed cancer costs far more than a false "
        "alarm, which a clinician's review catches, so specificity is the price paid for sensitivity. The "
        "threshold is stored inside the model, so every caller predicts with it.",
        "",
        "## Gate decision",
        "",
    ]
    if decision is not None:
        limits = decision.thresholds
        out += [
            f"Floors on the lower bounds: sensitivity {limits.sensitivity_lower:g}, specificity "
            f"{limits.specificity_lower:g}, ROC AUC {limits.roc_auc_lower:g}; per site: sensitivity "
            f"{limits.site_sensitivity_lower:g}, specificity {limits.site_specificity_lower:g}; non-inferiority "
            f"margin against the champion {limits.non_inferiority_margin:g} (AUC).",
            "",
        ]
        if decision.thresholds_below_protocol:
            out += [
                "**Thresholds below the protocol's floors** (a named person approved them, see below): "
                + "; ".join(decision.thresholds_below_protocol),
                "",
            ]
        out += [f"- {_cell(reason)}" for reason in decision.reasons]
    out += [
        "",
        "## Known limitations",
        "",
        "- The hold-out is small: with a few dozen malignant rows the lower bound of sensitivity cannot "
        "reach 0.95 even for a perfect model, so the floors are set below the intervals of today's sizes "
        "(see `pipelines/modification_protocol.yaml`); the intervals above say how sure each figure is.",
        "- DeLong's interval has no width when every malignant hold-out row scores above every benign one; "
        "sensitivity and specificity intervals do not have this blind spot.",
        "- The seed is the Wisconsin diagnostic breast cancer data from one institution; its sites are "
        "assigned round-robin, so per-site figures of the seed say little about real site differences. "
        "Later data versions add real sites through ingest and feedback.",
        *([f"- Not enough evidence at: {', '.join(thin)}."] if thin else []),
        "- Drift in the inputs or in prevalence changes these figures: monitoring compares served traffic "
        "with the training rows per site, and feedback labels measure performance after deployment.",
        "",
        "## Approvals and decisions",
        "",
    ]
    if decisions:
        out += ["| time (UTC) | action | by | reason | audit entry |", "| --- | --- | --- | --- | --- |"]
        out += [
            f"| {_cell(entry['time'][:19])} | {_cell(entry['action'])} | {_cell(entry['actor'])} "
            f"| {_cell(entry['reason'])} | seq {entry['seq']} `{entry['hash'][:12]}` |"
            for entry in decisions
        ]
    else:
        out.append("No decisions recorded for this version yet.")
    required = version_tags.get("approval_required")
    if required:
        out += ["", f"Promotion needs a named person's approval: {_cell(required)}."]
    return "\n".join(out) + "\n"
