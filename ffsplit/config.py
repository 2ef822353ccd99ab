"""Frozen, self-validating configs that round-trip to plain dicts (manifests, MLflow params, YAML).

Unknown keys are errors, never silently ignored (style.md, 5). Every config carries a version so an
artifact written by a newer ffsplit is refused rather than misread.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

from ffsplit.errors import FFSplitError

CONFIG_VERSION = 1

METHODS = ("lowrank", "quant", "prune", "none")
HEAL_LOSSES = ("local", "kl")
SELECTIONS = ("score", "random")
BASELINES = ("uniform", "random")


def _check_fraction(
    name: str, value: Any, *, low_open: bool = True, allow_zero: bool = False
) -> None:
    """Require a real number in (0, 1) (or [0, 1) with allow_zero)."""
    finite = not isinstance(value, float) or math.isfinite(value)  # ints: finite, maybe huge
    if isinstance(value, bool) or not isinstance(value, int | float) or not finite:
        raise FFSplitError(f"{name} must be a number in (0, 1), got {value!r}")
    ok = (0 <= value < 1) if allow_zero else (0 < value < 1)
    if not ok:
        bounds = "[0, 1)" if allow_zero else "(0, 1)"
        raise FFSplitError(f"{name} must be in {bounds}, got {value!r}")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FFSplitError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise FFSplitError(f"{name} must be {rng}, got {value}")


@dataclass(frozen=True)
class Config:
    """Base: dict round trip with strict keys and nested configs."""

    kind: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Self:
        located = where is not None  # a file or key path to put in front of value errors
        where = where or cls.kind
        if not isinstance(data, dict):
            raise FFSplitError(f"{where}: expected a mapping, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted((k for k in data if k not in known), key=repr)  # YAML keys may be ints
        if unknown:
            raise FFSplitError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(known)}"
            )
        version = data.get("version", CONFIG_VERSION)
        if "version" in known and version != CONFIG_VERSION:
            raise FFSplitError(
                f"{where}: format version {version!r} is not supported by this ffsplit "
                f"(expects {CONFIG_VERSION}); upgrade ffsplit or rewrite the file"
            )
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            f = known[name]
            sub = _nested_config_type(cls, f)
            if sub is not None:
                value = sub.from_dict(value, where=f"{where}.{name}")
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong types surfacing from dataclass construction
            raise FFSplitError(f"{where}: {exc}") from None
        except FFSplitError as exc:  # a bad value: say which file (or key path) holds it
            if not located:
                raise
            raise FFSplitError(f"{where}: {exc}") from None

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def _nested_config_type(cls: type, f: dataclasses.Field) -> type[Config] | None:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(default, Config):
        return type(default)
    return None


@dataclass(frozen=True)
class ProfileConfig(Config):
    """How neurons are profiled on calibration text (method.md, per-neuron statistics)."""

    kind: ClassVar[str] = "profile"
    version: int = CONFIG_VERSION
    corpus: str = "wikipedia"
    tokens: int = 32768
    window: int = 512
    batch_size: int = 4
    # hit_j counts tokens where neuron j is among the top-k output norms of its layer; k as a
    # fraction of the layer's neurons (1% picks "the few" heavy hitters of the paper's abstract).
    hit_top_fraction: float = 0.01
    # Gram matrices feed the activation-aware compressors (SVD-LLM / GPTQ); off saves memory.
    collect_grams: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus.strip():
            raise FFSplitError(
                f"profile.corpus must be a corpus name or a text file path, got {self.corpus!r}"
            )
        _check_int("profile.tokens", self.tokens, 1)
        _check_int("profile.window", self.window, 2, 1 << 20)
        _check_int("profile.batch_size", self.batch_size, 1, 4096)
        _check_fraction("profile.hit_top_fraction", self.hit_top_fraction)
        if self.tokens < self.window:
            raise FFSplitError(
                f"profile.tokens ({self.tokens}) must be at least one window ({self.window})"
            )
        if not isinstance(self.collect_grams, bool):
            raise FFSplitError(
                f"profile.collect_grams must be true or false, got {self.collect_grams!r}"
            )


@dataclass(frozen=True)
class LowRankConfig(Config):
    """Low-rank light part: activation-aware SVD by default, plain SVD as the weak baseline."""

    kind: ClassVar[str] = "lowrank"
    whiten: bool = True
    # Relative damping of the input second moment before Cholesky (SVD-LLM uses a small ridge).
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.whiten, bool):
            raise FFSplitError(f"lowrank.whiten must be true or false, got {self.whiten!r}")
        if not isinstance(self.damp, int | float) or not (0 <= self.damp < 10):
            raise FFSplitError(f"lowrank.damp must be in [0, 10), got {self.damp!r}")


@dataclass(frozen=True)
class QuantConfig(Config):
    """Quantized light part: group-wise along each neuron vector; heavy part 16 or 8 bit."""

    kind: ClassVar[str] = "quant"
    heavy_bits: int = 16
    # Bit widths the light neurons may take; the budget solver mixes two adjacent levels.
    ladder: tuple[int, ...] = (8, 4, 3, 2)
    group_size: int = 64
    gptq: bool = False

    def __post_init__(self) -> None:
        if self.heavy_bits not in (16, 8):
            raise FFSplitError(f"quant.heavy_bits must be 16 or 8, got {self.heavy_bits!r}")
        if not self.ladder or any(
            isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in self.ladder
        ):
            raise FFSplitError(f"quant.ladder must be bit widths in 2..8, got {self.ladder!r}")
        if list(self.ladder) != sorted(set(self.ladder), reverse=True):
            raise FFSplitError(f"quant.ladder must be strictly decreasing, got {self.ladder!r}")
        _check_int("quant.group_size", self.group_size, 8, 4096)
        if not isinstance(self.gptq, bool):
            raise FFSplitError(f"quant.gptq must be true or false, got {self.gptq!r}")


@dataclass(frozen=True)
class HealConfig(Config):
    """Healing: a short distillation of the compressed FFNs against the dense model (issue 6).

    steps=0 is off (the default: a recipe without healing compresses exactly as before). loss
    'kl' trains all FFNs at once on the KL divergence of the whole model's next-token
    distribution to the dense one's (steps in total; causal LMs); 'local' trains each FFN alone
    to reproduce the dense FFN's output on the dense model's FFN inputs (steps per layer; any
    model, layers independent). Only float parts train: low-rank factors, and with train_dense
    the dense (heavy or kept) blocks; quantized codes never do. Text: calibration windows of
    `corpus`, disjoint from evaluation text.

    Defaults: 'kl' at lr 3e-4, 2 windows per step. On SmolLM2 low-rank (heavy 0.1) at 43% FFN
    reduction, 2 CPU cores: 'local' (lr 1e-3; 1e-4 was ten times too slow) took perplexity 196 to
    80.9 in 20 steps per layer, 222 s (bench/results/heal-smollm2.json); 'kl' took it to 70.1
    in 30 steps, 214 s (the healed sweep on the results page): lower for the same time.
    """

    kind: ClassVar[str] = "heal"
    steps: int = 0
    loss: str = "kl"
    lr: float = 3e-4
    tokens: int = 16384
    window: int = 512
    batch_size: int = 2  # windows per step (loss 'local': their tokens, as rows)
    train_dense: bool = True
    corpus: str = "wikipedia"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("heal.steps", self.steps, 0, 1_000_000)
        if self.loss not in HEAL_LOSSES:
            raise FFSplitError(
                f"heal.loss must be one of {', '.join(HEAL_LOSSES)}, got {self.loss!r}"
            )
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, int | float)
            or not math.isfinite(self.lr)
            or not 0 < self.lr < 1
        ):
            raise FFSplitError(f"heal.lr must be a number in (0, 1), got {self.lr!r}")
        _check_int("heal.tokens", self.tokens, 2)
        _check_int("heal.window", self.window, 2, 1 << 20)
        _check_int("heal.batch_size", self.batch_size, 1, 4096)
        if self.tokens < self.window:
            raise FFSplitError(
                f"heal.tokens ({self.tokens}) must be at least one window ({self.window})"
            )
        if not isinstance(self.train_dense, bool):
            raise FFSplitError(f"heal.train_dense must be true or false, got {self.train_dense!r}")
        if not isinstance(self.corpus, str) or not self.corpus:
            raise FFSplitError(f"heal.corpus must be a corpus name, got {self.corpus!r}")
        _check_int("heal.seed", self.seed, 0)

    @property
    def enabled(self) -> bool:
        return self.steps > 0


@dataclass(frozen=True)
class Recipe(Config):
    """One compression recipe: what to do to every FFN of a model, at which budget.

    heavy_ratio 0 means no split (the 'uniform' baseline); selection 'random' is the random-split
    baseline; method 'prune' is score-based neuron pruning; method 'none' keeps the light part
    dense (the exactness check of the split itself).
    """

    kind: ClassVar[str] = "recipe"
    version: int = CONFIG_VERSION
    method: str = "lowrank"
    heavy_ratio: float = 0.1
    ffn_reduction: float = 0.3
    selection: str = "score"
    seed: int = 0
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    heal: HealConfig = field(default_factory=HealConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FFSplitError(
                f"recipe.method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        if self.selection not in SELECTIONS:
            raise FFSplitError(
                f"recipe.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )
        _check_fraction("recipe.heavy_ratio", self.heavy_ratio, allow_zero=True)
        if self.method == "none":
            if self.ffn_reduction != 0:
                raise FFSplitError("recipe.ffn_reduction must be 0 for method 'none'")
        else:
            _check_fraction("recipe.ffn_reduction", self.ffn_reduction)
        _check_int("recipe.seed", self.seed, 0)
        if self.heal.enabled:
            self._check_healable()

    def _check_healable(self) -> None:
        """Healing needs float weights to train: refuse recipes that leave it nothing."""
        if self.method == "none":
            raise FFSplitError("recipe.heal: method 'none' compresses nothing; set heal.steps 0")
        if self.heal.train_dense:
            dense_part = self.method == "prune" or (
                self.heavy_ratio > 0 and (self.method != "quant" or self.quant.heavy_bits == 16)
            )
            if self.method != "quant" or dense_part:
                return
        elif self.method == "lowrank":
            return
        raise FFSplitError(
            f"recipe.heal: nothing to train for method {self.method!r} "
            f"(heavy_ratio {self.heavy_ratio}, heal.train_dense {self.heal.train_dense}"
            + (f", quant.heavy_bits {self.quant.heavy_bits}" if self.method == "quant" else "")
            + "): quantized codes are not trained; train dense parts or set heal.steps 0"
        )

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. 'lowrank-h0.10-r0.30' or 'quant-uniform-r0.43'."""
        if self.method == "none":
            return f"split-h{self.heavy_ratio:.2f}"
        if self.method == "prune":
            tag = "prune" if self.selection == "score" else "prune-random"
        elif self.heavy_ratio == 0:
            tag = f"{self.method}-uniform"
        elif self.selection == "random":
            tag = f"{self.method}-random-h{self.heavy_ratio:.2f}"
        else:
            tag = f"{self.method}-h{self.heavy_ratio:.2f}"
        label = f"{tag}-r{self.ffn_reduction:.3f}".rstrip("0").rstrip(".")
        if self.heal.enabled:
            label += f"-heal{self.heal.steps}-{self.heal.loss}"
        return label

    @property
    def baseline(self) -> str | None:
        """Which method.md baseline this recipe is, or None for FFSplit itself."""
        if self.method == "prune":
            return "prune"
        if self.heavy_ratio == 0 and self.method != "none":
            return "uniform"
        if self.selection == "random":
            return "random"
        return None
