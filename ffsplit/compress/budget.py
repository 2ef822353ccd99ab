"""Byte accounting of one FFN and solvers that turn a budget into a rank, a bit mix or a neuron count.

Rules (docs/design.md): float weights count at 16 bits (the serving dtype); quantized codes at their
bit width, packed densely, plus a float16 scale and zero per group; biases are always dense 16-bit.
``reduction = 1 - compressed / dense`` over the FFN's weights and biases.

Neuron layout: the heavy neurons stay in every matrix of the FFN (up, gate, down) at 16 bits (or at
``heavy_bits`` for quantization); the light neurons are compressed in every matrix. Quantized neuron
vectors are stored neuron-major (``[neurons, d]``: rows of up/gate, ``W_down.T`` for down), one
quantized tensor per matrix per bit width, grouped along d, so ``group_size`` must divide d.

Solvers pick the largest rank / highest bit mix / largest kept count whose reduction is still
``>= reduction`` (the target), testing exactly the float that :func:`reduction` returns, so a caller
that checks ``reduction(dense, compressed) >= target`` always agrees.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ffsplit.errors import FFSplitError
from ffsplit.split.qformat import MAX_BITS, MIN_BITS, quantized_nbytes

FLOAT_BYTES = 2  # 16-bit serving dtype for float weights, biases, scales and zeros
DENSE_BITS = 16  # the "kept dense" level of a bit ladder
DEFAULT_LADDER = (8, 4, 3, 2)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FFNShape:
    """Sizes of one FFN: hidden size ``d``, ``m`` neurons, gated (3 matrices) or not (2), biases."""

    d: int
    m: int
    gated: bool
    up_bias: bool = False
    gate_bias: bool = False
    down_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("d", "m"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise FFSplitError(f"FFNShape: {name} must be a positive int, got {value!r}")
        for name in ("gated", "up_bias", "gate_bias", "down_bias"):
            if not isinstance(getattr(self, name), bool):
                raise FFSplitError(f"FFNShape: {name} must be a bool, got {getattr(self, name)!r}")
        if self.gate_bias and not self.gated:
            raise FFSplitError("FFNShape: gate_bias=True needs gated=True (no gate without gating)")

    @classmethod
    def from_weights(cls, weights: Any) -> FFNShape:
        """Shape of canonical FFN weights (anything with ``up [m, d]``, ``gate``, ``down``, biases)."""
        m, d = weights.up.shape
        return cls(
            d=int(d),
            m=int(m),
            gated=weights.gate is not None,
            up_bias=weights.up_bias is not None,
            gate_bias=weights.gate_bias is not None,
            down_bias=weights.down_bias is not None,
        )

    @property
    def matrices(self) -> int:
        """Weight matrices per FFN: up, gate (gated only), down."""
        return 3 if self.gated else 2

    def bias_bytes(self, neurons: int) -> int:
        """Bias bytes when ``neurons`` neurons exist: their up/gate bias entries plus down's ``[d]``."""
        entries = neurons * (self.up_bias + self.gate_bias) + self.d * self.down_bias
        return FLOAT_BYTES * entries


def _check_count(shape: FFNShape, value: int, name: str, where: str) -> None:
    if not _is_int(value) or not 0 <= value <= shape.m:
        raise FFSplitError(f"{where}: {name} {value!r} must be an int in 0..{shape.m} (m)")


def _check_target(value: float, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise FFSplitError(
            f"{where}: reduction {value!r} must be a number in [0, 1) (fraction of FFN bytes saved)"
        )


def reduction(dense_bytes: int, compressed_bytes: int) -> float:
    """``1 - compressed / dense``, computed as ``(dense - compressed) / dense`` (one rounding)."""
    if not _is_int(dense_bytes) or dense_bytes < 1:
        raise FFSplitError(f"reduction: dense_bytes must be a positive int, got {dense_bytes!r}")
    if not _is_int(compressed_bytes) or compressed_bytes < 0:
        raise FFSplitError(
            f"reduction: compressed_bytes must be a non-negative int, got {compressed_bytes!r}"
        )
    return (dense_bytes - compressed_bytes) / dense_bytes


def max_bytes(dense: int, target: float) -> int:
    """Largest byte count whose reduction() is still >= target (the float test the solvers use)."""
    value = math.floor(dense * (1 - target))
    while value > 0 and reduction(dense, value) < target:
        value -= 1
    while reduction(dense, value + 1) >= target:
        value += 1
    return value


def dense_ffn_bytes(shape: FFNShape) -> int:
    """Bytes of the uncompressed FFN: all matrices at 16 bits plus biases."""
    return FLOAT_BYTES * shape.matrices * shape.m * shape.d + shape.bias_bytes(shape.m)


def prune_bytes(shape: FFNShape, kept: int) -> int:
    """Bytes when only ``kept`` neurons remain (dense); pruned neurons take their biases with them."""
    _check_count(shape, kept, "kept", "prune_bytes")
    return FLOAT_BYTES * shape.matrices * kept * shape.d + shape.bias_bytes(kept)


def max_useful_rank(shape: FFNShape, heavy: int) -> int:
    """Largest rank at which a light matrix ``[m_L, d]`` factored is strictly smaller than dense:
    ``r (m_L + d) < m_L d``. 0 when there are no light neurons."""
    _check_count(shape, heavy, "heavy", "max_useful_rank")
    light = shape.m - heavy
    if light == 0:
        return 0
    return (light * shape.d - 1) // (light + shape.d)


def lowrank_bytes(shape: FFNShape, heavy: int, rank: int) -> int:
    """Bytes with ``heavy`` neurons dense and each light matrix factored to ``rank``.

    Each factored light matrix (up_L, gate_L ``[m_L, d]``, down_L ``[d, m_L]``) stores
    ``rank * (m_L + d)`` 16-bit values; biases stay whole. ``rank = 0`` means the light part is
    dropped, light biases included, which is exactly :func:`prune_bytes` with ``heavy`` kept.
    """
    where = "lowrank_bytes"
    _check_count(shape, heavy, "heavy", where)
    light = shape.m - heavy
    limit = min(light, shape.d)
    if not _is_int(rank) or not 0 <= rank <= limit:
        raise FFSplitError(
            f"{where}: rank {rank!r} must be an int in 0..{limit} (min of {light} light neurons "
            f"and d={shape.d})"
        )
    if rank == 0:
        return prune_bytes(shape, heavy)
    heavy_bytes = FLOAT_BYTES * shape.matrices * heavy * shape.d
    light_bytes = FLOAT_BYTES * shape.matrices * rank * (light + shape.d)
    return heavy_bytes + light_bytes + shape.bias_bytes(shape.m)


def _largest(low: int, high: int, fits: Callable[[int], bool]) -> int:
    """Largest n in [low, high] with ``fits(n)``, given ``fits(low)`` and fits monotone decreasing."""
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _heavy_ratio(shape: FFNShape, heavy: int) -> str:
    return f"heavy ratio {heavy / shape.m:.4g} ({heavy} of {shape.m} neurons)"


def solve_rank(shape: FFNShape, heavy: int, reduction: float) -> int:
    """Largest light rank whose reduction is ``>= reduction``; 0 means drop the light part.

    Capped at :func:`max_useful_rank` (a warning says so): above it low-rank is no smaller than the
    dense light part, so the target is then exceeded rather than met tightly.
    """
    where = "solve_rank"
    _check_count(shape, heavy, "heavy", where)
    _check_target(reduction, where)
    dense = dense_ffn_bytes(shape)

    def fits(rank: int) -> bool:
        return _achieved(dense, lowrank_bytes(shape, heavy, rank)) >= reduction

    if not fits(0):
        floor = lowrank_bytes(shape, heavy, 0)
        raise FFSplitError(
            f"budget {reduction:g} cannot be met with {_heavy_ratio(shape, heavy)}: heavy neurons "
            f"alone take {100 * floor / dense:.2f}% of FFN bytes; lower the heavy ratio or the "
            f"reduction"
        )
    cap = max_useful_rank(shape, heavy)
    rank = _largest(0, cap, fits)
    if rank == cap and cap > 0:
        achieved = _achieved(dense, lowrank_bytes(shape, heavy, cap))
        warnings.warn(
            f"solve_rank: rank capped at {cap}, the largest at which low-rank is smaller than the "
            f"dense light part; reduction {achieved:.4f} for a budget of {reduction:g}",
            stacklevel=2,
        )
    return rank


def _check_ladder(ladder: Iterable[int], where: str) -> tuple[int, ...]:
    levels = tuple(ladder)
    if not levels or any(not _is_int(b) or not MIN_BITS <= b <= MAX_BITS for b in levels):
        raise FFSplitError(
            f"{where}: ladder {levels!r} must list bit widths in {MIN_BITS}..{MAX_BITS}"
        )
    if len(set(levels)) != len(levels):
        raise FFSplitError(f"{where}: ladder {levels!r} repeats a bit width")
    return tuple(sorted(levels, reverse=True))


def _check_heavy_bits(heavy_bits: int, where: str) -> None:
    if not _is_int(heavy_bits) or not (
        heavy_bits == DENSE_BITS or MIN_BITS <= heavy_bits <= MAX_BITS
    ):
        raise FFSplitError(
            f"{where}: heavy_bits {heavy_bits!r} must be {DENSE_BITS} (dense) or in "
            f"{MIN_BITS}..{MAX_BITS}"
        )


def _level_bytes(shape: FFNShape, neurons: int, bits: int, group_size: int) -> int:
    """Bytes of ``neurons`` neuron vectors of length d in one matrix at ``bits`` (16 = dense)."""
    if neurons == 0:
        return 0
    if bits == DENSE_BITS:
        return FLOAT_BYTES * neurons * shape.d
    return quantized_nbytes(neurons, shape.d, bits, group_size)


def quant_bytes(
    shape: FFNShape,
    heavy: int,
    heavy_bits: int,
    light_bits_counts: dict[int, int],
    group_size: int,
) -> int:
    """Bytes with heavy neurons at ``heavy_bits`` and ``light_bits_counts[bits]`` light neurons at
    each bit width (16 = kept dense), one quantized tensor per matrix per width; biases whole."""
    where = "quant_bytes"
    _check_count(shape, heavy, "heavy", where)
    _check_heavy_bits(heavy_bits, where)
    if not _is_int(group_size) or group_size < 1 or shape.d % group_size:
        raise FFSplitError(
            f"{where}: group_size {group_size!r} must be a positive int dividing d={shape.d}"
        )
    light = shape.m - heavy
    for bits, count in light_bits_counts.items():
        if not _is_int(bits) or not (bits == DENSE_BITS or MIN_BITS <= bits <= MAX_BITS):
            raise FFSplitError(
                f"{where}: bit width {bits!r} in light_bits_counts must be {DENSE_BITS} or in "
                f"{MIN_BITS}..{MAX_BITS}"
            )
        if not _is_int(count) or count < 0:
            raise FFSplitError(f"{where}: count {count!r} for {bits} bits must be an int >= 0")
    if sum(light_bits_counts.values()) != light:
        raise FFSplitError(
            f"{where}: light_bits_counts {light_bits_counts} sums to "
            f"{sum(light_bits_counts.values())}, not the {light} light neurons (m - heavy)"
        )
    per_matrix = _level_bytes(shape, heavy, heavy_bits, group_size) + sum(
        _level_bytes(shape, count, bits, group_size) for bits, count in light_bits_counts.items()
    )
    return shape.matrices * per_matrix + shape.bias_bytes(shape.m)


def solve_light_bits(
    shape: FFNShape,
    heavy: int,
    heavy_bits: int,
    reduction: float,
    group_size: int,
    ladder: Iterable[int] = DEFAULT_LADDER,
) -> dict[int, int]:
    """Bit widths for the light neurons: ``{higher: n, lower: m_L - n}`` over two adjacent levels.

    Levels are ``heavy_bits`` (16 = dense) then the ladder's widths below it, so light neurons are
    never stored finer than heavy ones. The mix is the most bytes whose reduction is still
    ``>= reduction``: one more neuron at the higher level would miss it. The first ``n`` light
    neurons in order (the more important ones) get the higher level. Zero counts are left out; the
    dict runs from higher to lower bits. Uniform (no split) is ``heavy = 0, heavy_bits = 16``.
    """
    where = "solve_light_bits"
    _check_count(shape, heavy, "heavy", where)
    _check_heavy_bits(heavy_bits, where)
    _check_target(reduction, where)
    levels = (heavy_bits, *(b for b in _check_ladder(ladder, where) if b < heavy_bits))
    light = shape.m - heavy
    dense = dense_ffn_bytes(shape)

    def mix(bits_high: int, bits_low: int, count_high: int) -> dict[int, int]:
        if bits_high == bits_low:
            return {bits_high: light} if light else {}
        counts = {bits_high: count_high, bits_low: light - count_high}
        return {bits: count for bits, count in counts.items() if count > 0}

    def nbytes(high: int, low: int, count: int) -> int:
        return quant_bytes(shape, heavy, heavy_bits, mix(high, low, count), group_size)

    try:
        high, low, count = solve_two_levels(
            levels, light, nbytes, lambda b: _achieved(dense, b) >= reduction
        )
    except FFSplitError:
        floor = nbytes(levels[-1], levels[-1], light)
        raise FFSplitError(
            f"budget {reduction:g} cannot be met with {_heavy_ratio(shape, heavy)} at "
            f"{heavy_bits} bits: even every light neuron at {levels[-1]} bits leaves "
            f"{100 * floor / dense:.2f}% of FFN bytes; lower the heavy ratio or the reduction, or "
            f"add lower widths to the ladder"
        ) from None
    return mix(high, low, count)


def solve_two_levels(
    levels: Sequence[int],
    count: int,
    nbytes: Callable[[int, int, int], int],
    fits: Callable[[int], bool],
) -> tuple[int, int, int]:
    """``(high, low, n)``: the first n of ``count`` items at ``high``, the rest at ``low``, two
    adjacent entries of the descending ``levels``, with the most bytes that still ``fits``.
    ``nbytes(high, low, n)`` must grow with n. Every item at ``levels[0]`` is ``(l0, l0, count)``."""
    if fits(nbytes(levels[0], levels[0], count)):
        return levels[0], levels[0], count
    for high, low in zip(levels, levels[1:], strict=False):
        if fits(nbytes(high, low, 0)):
            best = _largest(0, count, lambda n, h=high, lo=low: fits(nbytes(h, lo, n)))
            return high, low, best
    raise FFSplitError(
        f"no mix of the widths {tuple(levels)} fits the budget: even all {count} items at "
        f"{levels[-1]} bits are too many bytes"
    )


def vector_bytes(d: int, bits: int, group_size: int) -> int:
    """Bytes of one neuron vector of length ``d`` at ``bits`` (16: dense), float16 scale and zero
    per group. Exact and additive over neurons (what per-neuron bit allocation needs) because
    ``d * bits`` is a whole number of bytes: d must be a multiple of 8, as in every model here."""
    where = "vector_bytes"
    if not _is_int(d) or d < 1 or d % 8:
        raise FFSplitError(f"{where}: d {d!r} must be a positive multiple of 8 (whole bytes)")
    _check_heavy_bits(bits, where)
    if not _is_int(group_size) or group_size < 1 or d % group_size:
        raise FFSplitError(f"{where}: group_size {group_size!r} must divide d={d}")
    if bits == DENSE_BITS:
        return FLOAT_BYTES * d
    return quantized_nbytes(1, d, bits, group_size)


def neuron_plan_bytes(
    shape: FFNShape,
    up_gate_bits: Sequence[int],
    down_bits: Sequence[int],
    group_size: int,
) -> int:
    """Exact bytes of an FFN whose neuron j keeps its up (and gate) rows at ``up_gate_bits[j]``
    and its down column at ``down_bits[j]`` (16: dense; a neuron absent from both is pruned, not
    allowed here). Neurons sharing a pair of widths form one block, one tensor per matrix, as the
    split modules store them; biases whole."""
    where = "neuron_plan_bytes"
    if len(up_gate_bits) != shape.m or len(down_bits) != shape.m:
        raise FFSplitError(
            f"{where}: need {shape.m} widths per part, got {len(up_gate_bits)} and {len(down_bits)}"
        )
    blocks = Counter(zip((int(b) for b in up_gate_bits), (int(b) for b in down_bits), strict=True))
    rows_matrices = shape.matrices - 1  # up, and gate when gated
    total = 0
    for (row_bits, down_width), count in blocks.items():
        for bits in (row_bits, down_width):
            _check_heavy_bits(bits, where)
        total += rows_matrices * _level_bytes(shape, count, row_bits, group_size)
        total += _level_bytes(shape, count, down_width, group_size)
    return total + shape.bias_bytes(shape.m)


def solve_kept_neurons(shape: FFNShape, reduction: float) -> int:
    """Largest number of neurons kept dense (the rest pruned) whose reduction is ``>= reduction``."""
    where = "solve_kept_neurons"
    _check_target(reduction, where)
    dense = dense_ffn_bytes(shape)

    def fits(kept: int) -> bool:
        return _achieved(dense, prune_bytes(shape, kept)) >= reduction

    if not fits(0):
        raise FFSplitError(
            f"budget {reduction:g} cannot be met by pruning: the down bias alone takes "
            f"{100 * prune_bytes(shape, 0) / dense:.2f}% of FFN bytes; lower the reduction"
        )
    if not fits(1):  # an FFN with no neuron left is not a model (issue 16: 0.999999 crashed)
        best = _achieved(dense, prune_bytes(shape, 1))
        raise FFSplitError(
            f"budget {reduction:g} cannot be met by pruning: keeping a single neuron of "
            f"{shape.m} saves {best:.6f}; lower the reduction"
        )
    return _largest(1, shape.m, fits)


# The solvers take a parameter named ``reduction`` (the target), which hides the function inside them.
_achieved = reduction
