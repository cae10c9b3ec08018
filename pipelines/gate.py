"""The promotion gate: judge a candidate by the lower bounds of its hold-out figures, overall and per site.

A candidate is promoted only when, on the stable hold-out, the lower ends of the 95 % intervals of
its sensitivity, specificity and ROC AUC reach the modification protocol's floors, when it is
non-inferior to the champion scored on the same rows (lower bound of the paired DeLong difference
AUC(candidate) - AUC(champion) >= -margin), and when every site with enough malignant (benign)
hold-out rows meets the site floor for sensitivity (specificity). Sites with fewer rows are
reported as "not enough evidence", never passed silently.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipelines.protocol import Protocol, Thresholds, thresholds_below_floors
from pipelines.uncertainty import AucDifference, AucEstimate, Proportion

Status = Literal["passed", "failed", "not_enough_evidence"]
OVERALL = "overall"


class ModelScores(NamedTuple):
    """One model on the hold-out rows: truth (malignant = True), P(malignant), and its decision."""

    is_malignant: np.ndarray
    probability: np.ndarray
    predicted: np.ndarray


class ModelFigures(BaseModel):
    """A model's figures on a group of rows; None where the rows cannot support the figure."""

    model_config = ConfigDict(frozen=True)

    sensitivity: Proportion | None = None
    specificity: Proportion | None = None
    roc_auc: AucEstimate | None = None


class Check(BaseModel):
    """One rule applied to one group of rows: what was compared with what, and the outcome."""

    model_config = ConfigDict(frozen=True)

    scope: str
    rule: str
    status: Status
    value: float | None
    floor: float
    reason: str


class GroupFigures(BaseModel):
    """Everything measured on one group of hold-out rows (all of them, or one site)."""

    model_config = ConfigDict(frozen=True)

    rows: int
    malignant: int
    benign: int
    status: Status
    candidate: ModelFigures
    champion: ModelFigures | None = None
    auc_difference: AucDifference | None = None
    notes: list[str] = []


class GateDecision(BaseModel):
    """The gate's verdict with every figure behind it; ``reasons`` read top to bottom for a reviewer."""

    model_config = ConfigDict(frozen=True)

    passed: bool
    reasons: list[str]
    protocol_version: int
    protocol_sha256: str
    thresholds: Thresholds
    thresholds_below_protocol: list[str]
    champion_version: str | None
    overall: GroupFigures
    sites: dict[str, GroupFigures]
    checks: list[Check]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (no NaN): safe for ``json.dumps``, MLflow and the model card."""
        return self.model_dump(mode="json")

    def metrics(self) -> dict[str, float]:
        """Flat numeric figures for ``mlflow.log_metrics``: ``gate_<figure>`` and ``gate_<site>_<figure>``."""
        flat: dict[str, float] = {"gate_passed": float(self.passed)}
        for scope, group in [(OVERALL, self.overall), *self.sites.items()]:
            prefix = "gate_" if scope == OVERALL else f"gate_{scope}_"
            flat[f"{prefix}malignant_rows"] = float(group.malignant)
            flat[f"{prefix}benign_rows"] = float(group.benign)
            for name, figure in group.candidate:
                if figure is not None:
                    flat[f"{prefix}{name}"] = figure.value
                    flat[f"{prefix}{name}_lower"] = figure.lower
                    flat[f"{prefix}{name}_upper"] = figure.upper
            if group.auc_difference is not None:
                flat[f"{prefix}auc_difference"] = group.auc_difference.value
                flat[f"{prefix}auc_difference_lower"] = group.auc_difference.lower
        return flat


def decide(
    candidate: ModelScores | tuple[np.ndarray, np.ndarray, np.ndarray],
    champion: ModelScores | tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    sites: np.ndarray,
    protocol: Protocol,
    *,
    thresholds: Thresholds | None = None,
    champion_version: str | None = None,
) -> GateDecision:
    """Judge a candidate (and compare it with the champion on the SAME rows) under the protocol.

    ``thresholds`` replaces the protocol's floors (a person's approved override); looser ones are
    listed in ``thresholds_below_protocol`` so the promotion step can ask for that approval.
    Raises ValueError when the arrays do not describe the same hold-out rows.
    """
    candidate = _scores(candidate, "candidate")
    champion = _scores(champion, "champion") if champion is not None else None
    sites = np.asarray(sites).astype(str)
    if len(sites) != len(candidate.is_malignant):
        raise ValueError(f"sites: {len(sites)} site ids for {len(candidate.is_malignant)} hold-out rows")
    if champion is not None and not np.array_equal(champion.is_malignant, candidate.is_malignant):
        raise ValueError("champion: scored on other rows than the candidate; compare both on the same hold-out rows")
    limits = thresholds or protocol.gate
    overall, overall_checks = _judge_group(OVERALL, np.ones(len(sites), dtype=bool), candidate, champion, limits)
    checks = list(overall_checks)
    reasons = [check.reason for check in overall_checks]
    if champion is None:
        reasons.append("no champion: non-inferiority not applicable (first model on these rows)")

    site_groups: dict[str, GroupFigures] = {}
    for site in sorted(set(sites.tolist())):
        group, site_checks = _judge_group(site, sites == site, candidate, champion, limits)
        site_groups[site] = group
        checks += site_checks
        reasons.append(_site_line(site, group, site_checks))
        reasons += [f"{site}: {note}" for note in group.notes]

    looser = thresholds_below_floors(protocol, limits)
    if looser:
        reasons.append(f"thresholds below the protocol's floors (need a named person's approval): {'; '.join(looser)}")
    passed = all(check.status != "failed" for check in checks) and all(
        check.status == "passed" for check in overall_checks
    )
    verdict = "promote" if passed else "refuse"
    reasons.insert(0, f"{verdict}: protocol v{protocol.version}, judged on the lower ends of 95 % intervals")
    return GateDecision(
        passed=passed,
        reasons=reasons,
        protocol_version=protocol.version,
        protocol_sha256=protocol.sha256,
        thresholds=limits,
        thresholds_below_protocol=looser,
        champion_version=champion_version,
        overall=overall,
        sites=site_groups,
        checks=checks,
    )


def _judge_group(
    scope: str, rows: np.ndarray, candidate: ModelScores, champion: ModelScores | None, limits: Thresholds
) -> tuple[GroupFigures, list[Check]]:
    """Figures of both models on these rows and the checks of the candidate against the floors."""
    from pipelines import uncertainty

    truth = candidate.is_malignant[rows]
    malignant, benign = int(truth.sum()), int((~truth).sum())
    mine = _figures(candidate, rows, limits)
    theirs = _figures(champion, rows, limits) if champion is not None else None
    difference = None
    if champion is not None and malignant >= 2 and benign >= 2:
        difference = uncertainty.auc_difference(
            truth, candidate.probability[rows], champion.probability[rows], confidence=limits.confidence
        )

    overall = scope == OVERALL
    need_positives = 1 if overall else limits.site_min_positives
    need_negatives = 1 if overall else limits.site_min_negatives
    sensitivity_floor = limits.sensitivity_lower if overall else limits.site_sensitivity_lower
    specificity_floor = limits.specificity_lower if overall else limits.site_specificity_lower
    checks = [
        _proportion_check(scope, "sensitivity", mine.sensitivity, malignant, need_positives, sensitivity_floor),
        _proportion_check(scope, "specificity", mine.specificity, benign, need_negatives, specificity_floor),
    ]
    if overall:
        checks.append(_auc_check(mine.roc_auc, limits.roc_auc_lower))
        if champion is not None:
            checks.append(_non_inferiority_check(difference, limits.non_inferiority_margin))

    statuses = {check.status for check in checks}
    status: Status = "failed" if "failed" in statuses else "passed" if statuses == {"passed"} else "not_enough_evidence"
    notes = [] if overall or theirs is None else _comparison_notes(mine, theirs, difference, limits)
    group = GroupFigures(
        rows=int(rows.sum()),
        malignant=malignant,
        benign=benign,
        status=status,
        candidate=mine,
        champion=theirs,
        auc_difference=difference,
        notes=notes,
    )
    return group, checks


def _figures(scores: ModelScores, rows: np.ndarray, limits: Thresholds) -> ModelFigures:
    from pipelines import uncertainty

    truth, predicted, probability = scores.is_malignant[rows], scores.predicted[rows], scores.probability[rows]
    malignant, benign = int(truth.sum()), int((~truth).sum())
    options = {"method": limits.interval, "confidence": limits.confidence}
    return ModelFigures(
        sensitivity=uncertainty.sensitivity(truth, predicted, **options) if malignant else None,
        specificity=uncertainty.specificity(truth, predicted, **options) if benign else None,
        roc_auc=uncertainty.roc_auc(truth, probability, confidence=limits.confidence)
        if malignant >= 2 and benign >= 2
        else None,
    )


def _proportion_check(scope: str, name: str, figure: Proportion | None, rows: int, needed: int, floor: float) -> Check:
    kind = "malignant" if name == "sensitivity" else "benign"
    rule = f"{name}_lower"
    if scope == OVERALL and figure is None:
        reason = f"overall: no {kind} hold-out rows, so {name} cannot be judged: refused"
        return Check(scope=scope, rule=rule, status="failed", value=None, floor=floor, reason=reason)
    if figure is None or rows < needed:
        reason = f"{scope}: {name} not judged, not enough evidence ({rows} {kind} hold-out rows, {needed} needed)"
        value = figure.lower if figure is not None else None
        return Check(scope=scope, rule=rule, status="not_enough_evidence", value=value, floor=floor, reason=reason)
    return _floor_check(scope, rule, figure.lower, floor, f"{scope}: {name} {interval_text(figure)}")


def _auc_check(figure: AucEstimate | None, floor: float) -> Check:
    if figure is None:
        reason = "overall: ROC AUC cannot be estimated (fewer than two malignant or two benign hold-out rows)"
        return Check(scope=OVERALL, rule="roc_auc_lower", status="failed", value=None, floor=floor, reason=reason)
    return _floor_check(
        OVERALL, "roc_auc_lower", figure.lower, floor, f"overall: ROC AUC {interval_text(figure, 4)} (DeLong)"
    )


def _floor_check(scope: str, rule: str, lower: float, floor: float, figure_text: str) -> Check:
    """A lower bound against its floor; ``figure_text`` opens the reason."""
    passed = lower >= floor
    reason = f"{figure_text}, lower bound {'>=' if passed else 'below'} floor {floor:g}"
    return Check(
        scope=scope, rule=rule, status="passed" if passed else "failed", value=lower, floor=floor, reason=reason
    )


def _non_inferiority_check(difference: AucDifference | None, margin: float) -> Check:
    if difference is None:
        reason = "overall: AUC difference vs champion cannot be estimated on these rows"
        return Check(scope=OVERALL, rule="non_inferiority", status="failed", value=None, floor=-margin, reason=reason)
    passed = difference.lower >= -margin
    return Check(
        scope=OVERALL,
        rule="non_inferiority",
        status="passed" if passed else "failed",
        value=difference.lower,
        floor=-margin,
        reason=f"overall: AUC candidate - champion {difference.value:+.4f} "
        f"[{difference.lower:+.4f}, {difference.upper:+.4f}] (paired DeLong; candidate {difference.candidate:.4f}, "
        f"champion {difference.champion:.4f}): "
        + ("non-inferior" if passed else "refused, may be worse")
        + f" (lower bound {'>=' if passed else 'below'} -{margin:g})",
    )


def _comparison_notes(
    mine: ModelFigures, theirs: ModelFigures, difference: AucDifference | None, limits: Thresholds
) -> list[str]:
    """What changed at a site between champion and candidate: the figures a reviewer looks for after drift."""
    notes = []
    for name, floor in (("sensitivity", limits.site_sensitivity_lower), ("specificity", limits.site_specificity_lower)):
        new, old = getattr(mine, name), getattr(theirs, name)
        if new is None or old is None or new.value == old.value:
            continue
        better = new.value > old.value
        clearly = better and new.lower > old.upper
        notes.append(
            f"{name} candidate {interval_text(new)} vs champion {interval_text(old)}"
            + (" (clearly better: intervals do not overlap)" if clearly else "")
            + (" (candidate meets the site floor the champion misses)" if new.lower >= floor > old.lower else "")
            + (" (champion meets the site floor the candidate misses)" if old.lower >= floor > new.lower else "")
        )
    if difference is not None and (difference.lower > 0 or difference.upper < 0):
        direction = "better" if difference.lower > 0 else "worse"
        notes.append(
            f"ROC AUC clearly {direction} than the champion here: {difference.value:+.4f} "
            f"[{difference.lower:+.4f}, {difference.upper:+.4f}]"
        )
    return notes


def _site_line(site: str, group: GroupFigures, checks: list[Check]) -> str:
    status = {"passed": "meets its floors", "failed": "FAILS its floors", "not_enough_evidence": "not enough evidence"}
    details = "; ".join(check.reason.removeprefix(f"{site}: ") for check in checks)
    return (
        f"{site}: {status[group.status]} ({group.rows} hold-out rows, {group.malignant} malignant, "
        f"{group.benign} benign): {details}"
    )


def interval_text(figure: Proportion | AucEstimate | None, digits: int = 3) -> str:
    """``value [lower, upper]``, with the counts behind a proportion; n/a for no figure."""
    if figure is None:
        return "n/a"
    counts = f" ({figure.successes}/{figure.total})" if isinstance(figure, Proportion) else ""
    return f"{figure.value:.{digits}f} [{figure.lower:.{digits}f}, {figure.upper:.{digits}f}]{counts}"


def _scores(scores: ModelScores | tuple[np.ndarray, np.ndarray, np.ndarray], name: str) -> ModelScores:
    try:
        is_malignant, probability, predicted = scores
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (is_malignant, probability, predicted) arrays") from None
    truth, predicted, probability = np.asarray(is_malignant), np.asarray(predicted), np.asarray(probability, "float64")
    for field, values in (("is_malignant", truth), ("predicted", predicted)):
        if values.dtype != bool and not np.isin(values, [0, 1]).all():
            raise ValueError(f"{name}.{field}: expected booleans (malignant = True)")
    lengths = {len(truth), len(probability), len(predicted)}
    if len(lengths) != 1:
        raise ValueError(f"{name}: arrays of different lengths {sorted(lengths)}; give one value per hold-out row")
    if not np.isfinite(probability).all() or ((probability < 0) | (probability > 1)).any():
        raise ValueError(f"{name}.probability: every P(malignant) must be a number between 0 and 1")
    return ModelScores(truth.astype(bool), probability, predicted.astype(bool))
