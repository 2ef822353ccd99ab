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

CONFIG_VERSION = 1  # of the profile, heal and evaluation configs
RECIPE_VERSION = 3  # recipes: 1 (PR <= 2026-11) and 2 migrate on read, see Recipe.from_dict

HEAL_LOSSES = ("local", "kl")
# Which neurons form the heavy set: by score (FFSplit), a random set of the same size (the
# random-split baseline), none at all (no split: the uniform baseline), or no neurons but the
# input columns of largest activation energy (the OWQ-style column-outlier baseline, quant only:
# ffsplit/compress/outliers.py; heavy_ratio is then the share of each matrix's inputs kept bf16).
SELECTIONS = ("score", "random", "none", "outlier")
BASELINES = ("uniform", "random", "prune", "outlier")
# Selections only some methods have (the sweep skips a baseline for the methods it lacks).
SELECTION_METHODS = {"outlier": ("quant",)}
# How the quant method gives out bit widths. "layer": every neuron vector of an FFN takes a width
# from the statistics (allocation.py: s_j^2 times its quantization error, a knapsack under the
# layer's byte budget), so the heavy set is whatever the budget makes worth 16 bits. "two-level":
# a heavy set of heavy_ratio at heavy_bits, light neurons over two adjacent widths in order (the
# paper's split, and the only placement the random and uniform baselines have).
ALLOCATIONS = ("layer", "two-level")

# Defaults, each written once here and read by the CLI, the flows, the deployments and the
# results page (style.md 14).
DEFAULT_HEAVY_RATIO = 0.1
# The column-outlier baseline's share of input columns kept bf16: what bench/lowbit.py's
# outlier-h0.01 ran at equal FFN bytes (bench/results/lowbit-smollm2-135m*.json); OWQ
# (arXiv 2306.02272) likewise keeps a small fraction of columns. DEFAULT_HEAVY_RATIO would not
# do: at 0.1 the kept bf16 columns alone are 10% of the dense FFN's bytes, 40% of a 75%-smaller
# FFN's budget.
DEFAULT_OUTLIER_RATIO = 0.01
DEFAULT_FFN_REDUCTION = 0.3
DEFAULT_CALIB_TOKENS = 32768  # a recipe's own profiling (library, CLI)
PIPELINE_CALIB_TOKENS = 16384  # the sweep and its nightly deployment: half, for the CPU budget
DEFAULT_EVAL_TOKENS = 16384
DEFAULT_WINDOW = 512
DEFAULT_CORPUS = "wikipedia"


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
    corpus: str = DEFAULT_CORPUS
    tokens: int = DEFAULT_CALIB_TOKENS
    window: int = DEFAULT_WINDOW
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
class EvalConfig(Config):
    """How a model is evaluated: quality on the evaluation split (fixed token budget) and the
    latency race against its dense base (prefill of a prompt, then greedy decode steps, dense and
    variant interleaved, `repeats` rounds)."""

    kind: ClassVar[str] = "eval"
    version: int = CONFIG_VERSION
    corpus: str = DEFAULT_CORPUS
    tokens: int = DEFAULT_EVAL_TOKENS
    window: int = DEFAULT_WINDOW
    latency: bool = True
    prompt_tokens: int = 128
    decode_tokens: int = 32
    repeats: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus.strip():
            raise FFSplitError(f"eval.corpus must be a corpus name, got {self.corpus!r}")
        _check_int("eval_tokens", self.tokens, 2)
        _check_int("eval_window", self.window, 2, 1 << 20)
        if self.tokens < self.window:
            raise FFSplitError(
                f"eval_tokens ({self.tokens}) must be at least one window ({self.window})"
            )
        if not isinstance(self.latency, bool):
            raise FFSplitError(f"eval.latency must be true or false, got {self.latency!r}")
        _check_int("latency_prompt_tokens", self.prompt_tokens, 1)
        _check_int("latency_decode_tokens", self.decode_tokens, 0)
        _check_int("latency_repeats", self.repeats, 1)

    @property
    def workload(self) -> dict[str, int]:
        """The latency race's workload (ffsplit.jobs.latency_against_base's keyword arguments)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "decode_tokens": self.decode_tokens,
            "repeats": self.repeats,
        }

    def key_dict(self) -> dict[str, Any]:
        """What changes an evaluation record: the workload only when the race runs."""
        out = self.to_dict()
        if not self.latency:
            for name in self.workload:
                out.pop(name)
        return out


class MethodConfig(Config):
    """How the light part is compressed. The config's type is the method: compressors register
    against it (ffsplit.compress.recipe.PLANNERS), as torchao binds configs to handlers."""

    kind: ClassVar[str] = "method"
    # Fields that place a recipe on the grid (like selection) rather than set an option: the
    # results page compares variants across them.
    placement: ClassVar[tuple[str, ...]] = ()

    @property
    def needs_grams(self) -> bool:
        """Whether this compressor reads the calibration Gram matrices."""
        return bool(self.gram_settings)

    @property
    def gram_settings(self) -> list[str]:
        """The settings that read the Gram matrices (for the error when they are not profiled)."""
        return []


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}


def method_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Register a method config type under its kind (the recipe's `method` name)."""
    METHOD_CONFIGS[cls.kind] = cls
    return cls


@method_config
@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
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

    @property
    def gram_settings(self) -> list[str]:
        return ["lowrank.whiten"] if self.whiten else []


@method_config
@dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """Quantized light part: group-wise along each neuron vector; heavy part 16 or 8 bit.

    Defaults are what won at equal FFN bytes on SmolLM2 and MiniLM at 60-80% smaller FFNs
    (bench/results/lowbit-*.json, docs/results.md "Low-bit"): widths per neuron by the layer
    allocation over the ladder (plus bf16 when heavy_bits is 16), GPTQ with activation order for
    up/gate rows and GPTQ over neurons for down.
    """

    kind: ClassVar[str] = "quant"
    placement: ClassVar[tuple[str, ...]] = ("allocation",)
    heavy_bits: int = 16  # the top width: bf16 (16) or int8 (8)
    # Bit widths below heavy_bits that neurons may take. two-level mixes two adjacent ones.
    ladder: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    group_size: int = 64
    allocation: str = "layer"
    gptq: bool = True  # GPTQ on the FFN input Gram for up/gate rows (else round to nearest)
    act_order: bool = True  # GPTQ in order of decreasing input energy
    gptq_down: bool = True  # GPTQ over neurons on the hidden Gram for down (else round to nearest)

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
        if self.allocation not in ALLOCATIONS:
            raise FFSplitError(
                f"quant.allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}"
            )
        for name in ("gptq", "act_order", "gptq_down"):
            if not isinstance(getattr(self, name), bool):
                raise FFSplitError(
                    f"quant.{name} must be true or false, got {getattr(self, name)!r}"
                )

    @property
    def levels(self) -> tuple[int, ...]:
        """Every width a neuron vector may take under the layer allocation, highest first."""
        top = (16,) if self.heavy_bits == 16 else ()
        return top + tuple(b for b in self.ladder if b <= self.heavy_bits)

    @property
    def gram_settings(self) -> list[str]:
        out = [f"quant.{name}" for name in ("gptq", "gptq_down") if getattr(self, name)]
        return out + (["quant.allocation 'layer'"] if self.allocation == "layer" else [])


@method_config
@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """Score-based neuron pruning: keep the highest-scoring neurons that fit the budget, drop the
    rest (the structured-pruning end of the range, a baseline of method.md)."""

    kind: ClassVar[str] = "prune"


@method_config
@dataclass(frozen=True)
class SplitOnlyConfig(MethodConfig):
    """No compression: the split alone (its exactness is a tested invariant), or with selection
    'none' the dense model itself (the sweep's reference)."""

    kind: ClassVar[str] = "none"


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

    `method` is the light part's compressor config; its type says which method it is (a name like
    "quant" is accepted as that method's default config). `selection` says what the heavy set is:
    "score" (FFSplit), "random" (the random-split baseline, seeded), "none" (no split: the
    uniform baseline, and the dense reference with method "none") or "outlier" (quant only: the
    column-outlier baseline, whose `heavy_ratio` is the share of each matrix's input columns kept
    bf16, DEFAULT_OUTLIER_RATIO when unset). Pruning is a method whose kept set is the score
    order. Only what a recipe is goes in: `heavy_ratio` is None where there is no heavy set to
    size (selection "none", pruning). Every cross-field rule is checked here.
    """

    kind: ClassVar[str] = "recipe"
    version: int = RECIPE_VERSION
    method: MethodConfig = field(default_factory=LowRankConfig)
    selection: str = "score"
    heavy_ratio: float | None = None  # None: DEFAULT_HEAVY_RATIO where there is a heavy set
    ffn_reduction: float = DEFAULT_FFN_REDUCTION
    seed: int = 0
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    heal: HealConfig = field(default_factory=HealConfig)

    def __post_init__(self) -> None:
        if isinstance(self.method, str):  # a method's name: its default config
            if self.method not in METHOD_CONFIGS:
                raise FFSplitError(
                    f"recipe.method must be one of {', '.join(METHOD_CONFIGS)}, got {self.method!r}"
                )
            object.__setattr__(self, "method", METHOD_CONFIGS[self.method]())
        if not isinstance(self.method, MethodConfig):
            raise FFSplitError(f"recipe.method must be a method config, got {self.method!r}")
        if self.version != RECIPE_VERSION:
            raise FFSplitError(
                f"recipe.version must be {RECIPE_VERSION}, got {self.version!r} (older recipes "
                "are migrated by Recipe.from_dict)"
            )
        if self.selection not in SELECTIONS:
            raise FFSplitError(
                f"recipe.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )
        self._check_selection_method()
        self._check_heavy_ratio()
        if self.method_name == "none":
            if self.ffn_reduction != 0:
                raise FFSplitError("recipe.ffn_reduction must be 0 for method 'none'")
        else:
            _check_fraction("recipe.ffn_reduction", self.ffn_reduction)
        _check_int("recipe.seed", self.seed, 0)
        if self.needs_grams and not self.profile.collect_grams:
            settings = self.gram_settings
            what = " and ".join(settings)
            raise FFSplitError(
                f"recipe '{self.label}': {what} {'needs' if len(settings) == 1 else 'need'} Gram "
                f"matrices, but profile.collect_grams is false; set profile.collect_grams true, "
                f"or turn {what} off"
            )
        if self.heal.enabled:
            self._check_healable()

    def _check_selection_method(self) -> None:
        """A selection that only some methods have (SELECTION_METHODS) comes with one of them."""
        methods = SELECTION_METHODS.get(self.selection)
        if methods is None or self.method_name in methods:
            return
        method = self.method_name
        others = [s for s in SELECTIONS if method in SELECTION_METHODS.get(s, (method,))]
        raise FFSplitError(
            f"recipe.selection {self.selection!r} applies to method "
            f"{' or '.join(map(repr, methods))} only, got method {method!r}: set "
            f"recipe.method {methods[0]!r} or another selection ({', '.join(others)})"
        )

    def _check_heavy_ratio(self) -> None:
        """A heavy ratio exactly where there is a heavy set to size (for selection 'outlier':
        the share of input columns kept bf16)."""
        if self.method_name == "prune" and self.selection == "none":
            raise FFSplitError("recipe: prune keeps neurons in an order; selection 'none' has none")
        allocated = self.method_name == "quant" and self.method.allocation == "layer"  # type: ignore[attr-defined]
        if allocated and self.selection != "score":
            raise FFSplitError(
                f"recipe: quant.allocation 'layer' gives widths by neuron score; selection "
                f"{self.selection!r} has none: set quant.allocation 'two-level'"
            )
        heavy_bits = getattr(self.method, "heavy_bits", 16)
        if self.selection == "outlier" and heavy_bits != 16:
            raise FFSplitError(
                f"recipe: selection 'outlier' keeps its columns in bf16; quant.heavy_bits "
                f"{heavy_bits} does not apply to it: set quant.heavy_bits 16"
            )
        sized = self.selection != "none" and self.method_name != "prune" and not allocated
        if sized and self.heavy_ratio is None:
            default = DEFAULT_OUTLIER_RATIO if self.selection == "outlier" else DEFAULT_HEAVY_RATIO
            object.__setattr__(self, "heavy_ratio", default)
        if sized:
            _check_fraction("recipe.heavy_ratio", self.heavy_ratio)
        elif self.heavy_ratio is not None:
            why = (
                "pruning keeps neurons in score order"
                if self.method_name == "prune"
                else "quant.allocation 'layer' sizes the heavy set from the statistics (set "
                "quant.allocation 'two-level' to size it yourself)"
                if allocated
                else "selection 'none' has no heavy set"
            )
            raise FFSplitError(
                f"recipe.heavy_ratio must be unset (null): {why}; got {self.heavy_ratio!r}"
            )

    def _check_healable(self) -> None:
        """Healing needs float weights to train: refuse recipes that leave it nothing."""
        method = self.method_name
        if method == "none":
            raise FFSplitError("recipe.heal: method 'none' compresses nothing; set heal.steps 0")
        if self.heal.train_dense:
            # a heavy set to train: sized by heavy_ratio, or by the quant allocation (bf16 level)
            heavy = self.heavy_ratio is not None or (
                method == "quant" and self.method.allocation == "layer"  # type: ignore[attr-defined]
            )
            dense_part = method == "prune" or (
                heavy and (method != "quant" or self.method.heavy_bits == 16)  # type: ignore[attr-defined]
            )
            if method != "quant" or dense_part:
                return
        elif method == "lowrank":
            return
        raise FFSplitError(
            f"recipe.heal: nothing to train for method {method!r} "
            f"(heavy_ratio {self.heavy_ratio}, heal.train_dense {self.heal.train_dense}"
            + (f", quant.heavy_bits {self.method.heavy_bits}" if method == "quant" else "")  # type: ignore[attr-defined]
            + "): quantized codes are not trained; train dense parts or set heal.steps 0"
        )

    # ----------------------------------------------------------------------------- what it is

    @property
    def method_name(self) -> str:
        return self.method.kind

    @property
    def heavy(self) -> float:
        """The heavy ratio as a number (0 where there is no heavy set)."""
        return 0.0 if self.heavy_ratio is None else float(self.heavy_ratio)

    @property
    def baseline(self) -> str | None:
        """Which baseline this recipe is ("uniform", "random", "prune", "outlier"), or None for
        FFSplit itself and for the split-only / dense references (method 'none')."""
        if self.method_name == "prune":
            return "prune"
        if self.method_name == "none":
            return None
        return {"none": "uniform", "random": "random", "outlier": "outlier"}.get(self.selection)

    @property
    def series(self) -> str:
        """Its line in the trade-off charts: ffsplit-<method>, <baseline>-<method>, prune, dense."""
        if self.method_name == "none":
            return "dense" if self.selection == "none" else "split"
        if self.baseline == "prune":
            return "prune" if self.selection == "score" else "prune-random"
        return f"{self.baseline or 'ffsplit'}-{self.method_name}"

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. 'lowrank-h0.10-r0.3' or 'quant-uniform-r0.43'."""
        method = self.method_name
        if method == "none":
            return "dense" if self.selection == "none" else f"split-h{self.heavy:.2f}"
        if method == "prune":
            tag = "prune" if self.selection == "score" else "prune-random"
        elif self.selection == "none":
            tag = f"{method}-uniform"
        elif self.selection in ("random", "outlier"):
            tag = f"{method}-{self.selection}-h{self.heavy:.2f}"
        elif self.heavy_ratio is None:  # the quant layer allocation sizes its own heavy set
            tag = f"{method}-alloc"
        else:
            tag = f"{method}-h{self.heavy:.2f}"
        label = f"{tag}-r{self.ffn_reduction:.3f}".rstrip("0").rstrip(".")
        if self.heal.enabled:
            label += f"-heal{self.heal.steps}-{self.heal.loss}"
        return label

    @property
    def needs_grams(self) -> bool:
        """Whether compressing reads the calibration Gram matrices (profile.collect_grams)."""
        return bool(self.gram_settings)

    @property
    def gram_settings(self) -> list[str]:
        """The settings that read the Gram matrices: the method's, and selection 'outlier'
        (its columns are those of largest Gram diagonal)."""
        outlier = ["selection 'outlier'"] if self.selection == "outlier" else []
        return outlier + self.method.gram_settings

    @property
    def needs_statistics(self) -> bool:
        """Score selection (and pruning by score), the column-outlier baseline, activation-aware
        SVD and GPTQ read profiling statistics; nothing else does."""
        return self.selection == "score" or self.needs_grams

    def unhealed(self) -> Recipe:
        """The compression alone (shards and the assembled variant; healing comes after)."""
        return self.replace(heal=HealConfig())

    # --------------------------------------------------------------------------------- as dicts

    def to_dict(self) -> dict[str, Any]:
        """The whole recipe: version, the method's name and its config under that name."""
        out: dict[str, Any] = {"version": self.version, "method": self.method_name}
        method = self.method.to_dict()
        if method:
            out[self.method_name] = method
        out["selection"] = self.selection
        if self.heavy_ratio is not None:
            out["heavy_ratio"] = self.heavy_ratio
        out["ffn_reduction"] = self.ffn_reduction
        out["seed"] = self.seed
        out["profile"] = self.profile.to_dict()
        out["heal"] = self.heal.to_dict()
        return out

    def key_dict(self) -> dict[str, Any]:
        """Only what changes the compressed artifact (cache keys): the seed of a random set,
        calibration settings when statistics are read, healing when it is on."""
        out = self.to_dict()
        if self.selection != "random":
            out.pop("seed")
        if not self.needs_statistics:
            out.pop("profile")
        if not self.heal.enabled:
            out.pop("heal")
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Recipe:
        """A recipe from its dict; version 1 dicts (before 2026-12) are migrated."""
        located = where is not None
        where = where or cls.kind
        if not isinstance(data, dict):
            raise FFSplitError(f"{where}: expected a mapping, got {type(data).__name__}")
        version = data.get("version", RECIPE_VERSION)
        if version == 1:
            data = _migrate_recipe_v2(_migrate_recipe_v1(data))
        elif version == 2:
            data = _migrate_recipe_v2(data)
        elif version != RECIPE_VERSION:
            raise FFSplitError(
                f"{where}: format version {version!r} is not supported by this ffsplit "
                f"(expects {RECIPE_VERSION}); upgrade ffsplit or rewrite the file"
            )
        method = data.get("method", LowRankConfig.kind)
        if not isinstance(method, str) or method not in METHOD_CONFIGS:
            raise FFSplitError(
                f"{where}: recipe.method must be one of {', '.join(METHOD_CONFIGS)}, got {method!r}"
            )
        known = ("version", "method", method, "selection", "heavy_ratio", "ffn_reduction", "seed")
        known += ("profile", "heal")
        unknown = sorted((k for k in data if k not in known), key=repr)
        if unknown:
            others = [k for k in unknown if k in METHOD_CONFIGS]
            hint = f" (settings of method {others[0]!r}, not {method!r})" if others else ""
            raise FFSplitError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}{hint}; known keys: "
                f"{', '.join(known)}"
            )
        config_type = METHOD_CONFIGS[method]
        kwargs: dict[str, Any] = {
            "method": config_type.from_dict(data.get(method, {}), where=f"{where}.{method}")
        }
        for name in ("selection", "heavy_ratio", "ffn_reduction", "seed"):
            if name in data:
                kwargs[name] = data[name]
        for name, sub in (("profile", ProfileConfig), ("heal", HealConfig)):
            if name in data:
                kwargs[name] = sub.from_dict(data[name], where=f"{where}.{name}")
        try:
            return cls(**kwargs)
        except FFSplitError as exc:
            if not located:
                raise
            raise FFSplitError(f"{where}: {exc}") from None


# What a version-2 quant config meant by its absent keys (the defaults before the allocation).
_QUANT_V2 = {
    "ladder": [8, 4, 3, 2],
    "allocation": "two-level",
    "gptq": False,
    "act_order": False,
    "gptq_down": False,
}


def method_defaults(name: str, version: int = RECIPE_VERSION) -> MethodConfig:
    """Method `name`'s default config in the ffsplit that wrote recipe `version`: what a run of
    that time did without being told (the results page lists only options that differ)."""
    if name == "quant" and version < 3:
        return QuantConfig.from_dict(_QUANT_V2)
    return METHOD_CONFIGS[name]()


def _migrate_recipe_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 changed the quant defaults (layer allocation, GPTQ with activation order, down
    by GPTQ, the ladder); a version-2 quant recipe states what it was made with. Same variants."""
    out = dict(data)
    out["version"] = RECIPE_VERSION
    if out.get("method") == "quant":
        quant = out.get("quant", {})
        if isinstance(quant, dict):
            out["quant"] = {**_QUANT_V2, **quant}
    return out


def _migrate_recipe_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 said "uniform" by heavy_ratio 0 and carried every method's sub-config; version
    2 says it by selection 'none' and keeps only the method's own config. Same variants."""
    out = dict(data)
    out["version"] = 2
    method = out.get("method", "lowrank")
    for other in ("lowrank", "quant"):
        if other != method:
            out.pop(other, None)
    ratio = out.get("heavy_ratio", DEFAULT_HEAVY_RATIO)
    if method == "prune":
        out.pop("heavy_ratio", None)
        out.setdefault("selection", "score")
    elif isinstance(ratio, int | float) and not isinstance(ratio, bool) and ratio == 0:
        out.pop("heavy_ratio", None)
        out["selection"] = "none"
    return out
