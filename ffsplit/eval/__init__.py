"""Model-agnostic evaluation: perplexity, linear-probe accuracy, size and latency.

Inputs are models and tensors (never file paths), so the CLI, the pipeline tasks and the benchmarks
share one implementation.
"""

from ffsplit.eval.latency import (
    LatencyResult,
    LayerLatency,
    Speedup,
    ffn_layer_latency,
    measure_latency,
    paired_speedup,
    speedup_intervals,
    speedups,
)
from ffsplit.eval.perplexity import PerplexityResult, model_device, perplexity, sequence_nll
from ffsplit.eval.probe import ProbeResult, embed, linear_probe, probe_accuracy
from ffsplit.eval.size import SizeReport, model_size, size_reduction

__all__ = [
    "LatencyResult",
    "LayerLatency",
    "PerplexityResult",
    "ProbeResult",
    "SizeReport",
    "Speedup",
    "embed",
    "ffn_layer_latency",
    "linear_probe",
    "measure_latency",
    "model_device",
    "model_size",
    "paired_speedup",
    "perplexity",
    "probe_accuracy",
    "sequence_nll",
    "size_reduction",
    "speedup_intervals",
    "speedups",
]
