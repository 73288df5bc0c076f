"""gradguard: keep deep-network training stable.

Measure per-layer gradient statistics on the device, treat bad steps (clipping, skipping,
back-off, rollback), diagnose vanishing and exploding gradients, and demonstrate the textbook
remedies in a lab.
"""

from gradguard.clip import (
    adaptive_clip_grad_,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
)
from gradguard.doctor import diagnose
from gradguard.findings import Finding, Report
from gradguard.guard import Guard, GuardError, StepOutcome
from gradguard.history import History
from gradguard.policies import AGC, AutoClip, FixedClip, ValueClip, ZClip
from gradguard.sinks import CSVSink, JSONLSink, MLflowSink, TensorBoardSink, WandbSink
from gradguard.recovery import SpikePolicy
from gradguard.stats import GradStats, grad_stats
from gradguard.report import plots as _plots  # noqa: E402,F401  (installs Report.to_html)
from gradguard import lab  # noqa: E402  (the lab imports its heavy dependencies lazily)

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AutoClip",
    "CSVSink",
    "Finding",
    "FixedClip",
    "GradStats",
    "Guard",
    "GuardError",
    "History",
    "JSONLSink",
    "MLflowSink",
    "Report",
    "SpikePolicy",
    "StepOutcome",
    "TensorBoardSink",
    "ValueClip",
    "WandbSink",
    "ZClip",
    "__version__",
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "diagnose",
    "get_total_norm",
    "grad_stats",
    "lab",
]
