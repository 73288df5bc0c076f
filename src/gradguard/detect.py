"""Moved to :mod:`gradguard.doctor.detectors` (kept importable for code written against 0.1)."""

from gradguard.doctor.detectors import (  # noqa: F401
    CAUSES, CODES, DETECTORS, REMEDIES, LayerView, layer_view, run_detectors,
)
