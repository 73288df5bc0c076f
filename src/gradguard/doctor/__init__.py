"""The doctor: a short instrumented run on a copy of the model, the detectors, and remedy trials
ranked by the loss they reach.

Modules: :mod:`~gradguard.doctor.run` (the instrumented run: the user's recipe on a copy),
:mod:`~gradguard.doctor.probes` (forward hooks), :mod:`~gradguard.doctor.detectors` (one module
per family), :mod:`~gradguard.doctor.remedies` (changes applied to a copy, and how each remedy is
tried), :mod:`~gradguard.doctor.ranking` (trials measured against the untreated run) and
:mod:`~gradguard.doctor.session` (``diagnose`` itself).
"""

from __future__ import annotations

from gradguard.doctor.run import activation_map
from gradguard.doctor.session import Prescription, diagnose, findings_from_history, prescribe

__all__ = ["Prescription", "activation_map", "diagnose", "findings_from_history", "prescribe"]
