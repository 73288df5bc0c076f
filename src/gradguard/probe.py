"""Moved to :mod:`gradguard.doctor.probes` (kept importable for code written against 0.1)."""

from gradguard.doctor.probes import (  # noqa: F401
    ParamInfo, Probe, ProbeSummary, SiteStats, TemporalStats, activation_kind, param_infos,
)
