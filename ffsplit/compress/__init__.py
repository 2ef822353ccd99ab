"""Pure compression math: low-rank factors, group-wise quantization, byte budgets.

No hooks, modules or I/O here: functions take and return tensors and numbers. ``recipe.py``
(orchestration over a whole model) builds on them.
"""

from ffsplit.compress.budget import (
    FFNShape,
    dense_ffn_bytes,
    lowrank_bytes,
    max_useful_rank,
    prune_bytes,
    quant_bytes,
    reduction,
    solve_kept_neurons,
    solve_light_bits,
    solve_rank,
)
from ffsplit.compress.lowrank import (
    WhitenedFactors,
    output_error,
    svd_factors,
    whitened_svd,
    whitened_svd_factors,
)
from ffsplit.compress.quant import gptq_quantize, quantize_groups, sqnr_db

__all__ = [
    "FFNShape",
    "WhitenedFactors",
    "dense_ffn_bytes",
    "gptq_quantize",
    "lowrank_bytes",
    "max_useful_rank",
    "output_error",
    "prune_bytes",
    "quant_bytes",
    "quantize_groups",
    "reduction",
    "solve_kept_neurons",
    "solve_light_bits",
    "solve_rank",
    "sqnr_db",
    "svd_factors",
    "whitened_svd",
    "whitened_svd_factors",
]
