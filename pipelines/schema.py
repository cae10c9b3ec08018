"""The clinical data contract, shared by ingest validation, the service and monitoring.

Thirty numeric features of the Wisconsin diagnostic breast cancer data in snake_case, the label
``diagnosis`` (``malignant`` is the positive class) and the ``site_id`` of the sending hospital.
Plausible ranges are wide (about twice what the seed data shows, never below zero) so that real
variation passes and values in the wrong unit (micrometres for millimetres, say) do not.
"""

from __future__ import annotations

LABEL = "diagnosis"
SITE = "site_id"
ENCOUNTER = "encounter_id"
POSITIVE = "malignant"
NEGATIVE = "benign"
CLASSES = (NEGATIVE, POSITIVE)

# feature -> (lowest plausible, highest plausible)
FEATURE_RANGES: dict[str, tuple[float, float]] = {
    "mean_radius": (0.0, 60.0),
    "mean_texture": (0.0, 80.0),
    "mean_perimeter": (0.0, 400.0),
    "mean_area": (0.0, 6000.0),
    "mean_smoothness": (0.0, 0.35),
    "mean_compactness": (0.0, 0.7),
    "mean_concavity": (0.0, 0.9),
    "mean_concave_points": (0.0, 0.45),
    "mean_symmetry": (0.0, 0.6),
    "mean_fractal_dimension": (0.0, 0.2),
    "radius_error": (0.0, 6.0),
    "texture_error": (0.0, 10.0),
    "perimeter_error": (0.0, 45.0),
    "area_error": (0.0, 1100.0),
    "smoothness_error": (0.0, 0.07),
    "compactness_error": (0.0, 0.3),
    "concavity_error": (0.0, 0.8),
    "concave_points_error": (0.0, 0.11),
    "symmetry_error": (0.0, 0.16),
    "fractal_dimension_error": (0.0, 0.06),
    "worst_radius": (0.0, 75.0),
    "worst_texture": (0.0, 100.0),
    "worst_perimeter": (0.0, 500.0),
    "worst_area": (0.0, 9000.0),
    "worst_smoothness": (0.0, 0.45),
    "worst_compactness": (0.0, 2.2),
    "worst_concavity": (0.0, 2.5),
    "worst_concave_points": (0.0, 0.6),
    "worst_symmetry": (0.0, 1.4),
    "worst_fractal_dimension": (0.0, 0.45),
}
FEATURES: tuple[str, ...] = tuple(FEATURE_RANGES)

# What each measurement of a cell nucleus is, and its unit. The dataset's description (sklearn's
# load_breast_cancer().DESCR, from UCI's WDBC) gives no physical units: sizes were measured on
# digitised images, so they are in image units (pixels), areas in square image units.
_MEASUREMENTS: dict[str, tuple[str, str]] = {
    "radius": ("mean distance from the centre to points on the perimeter", "image units (pixels)"),
    "texture": ("standard deviation of grey-scale values", "grey levels"),
    "perimeter": ("perimeter of the nucleus", "image units (pixels)"),
    "area": ("area of the nucleus", "square image units (pixels²)"),
    "smoothness": ("local variation in radius lengths", "dimensionless"),
    "compactness": ("perimeter² / area − 1.0", "dimensionless"),
    "concavity": ("severity of the concave portions of the contour", "dimensionless"),
    "concave_points": ("concave portions of the contour (as distributed: scaled, not a count)", "dimensionless"),
    "symmetry": ("symmetry of the nucleus", "dimensionless"),
    "fractal_dimension": ('"coastline approximation" − 1', "dimensionless"),
}
_STATISTICS = {
    "mean": "mean over the nuclei in the image",
    "error": "standard error over the nuclei in the image",
    "worst": "mean of the three largest values in the image",
}


def feature_description(name: str) -> str:
    """What a feature measures, its unit and its plausible range, in words for API docs and reports."""
    statistic = "mean" if name.startswith("mean_") else "worst" if name.startswith("worst_") else "error"
    measurement = name.removeprefix("mean_").removeprefix("worst_").removesuffix("_error")
    meaning, unit = _MEASUREMENTS[measurement]
    low, high = FEATURE_RANGES[name]
    return f"{meaning.capitalize()}: {_STATISTICS[statistic]}. Unit: {unit}. Plausible range {low:g} to {high:g}."


DATA_COLUMNS: tuple[str, ...] = (*FEATURES, LABEL, SITE)
SITE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
