"""What the pipeline's stages hand each other: small frozen records (paths, keys, numbers).

Ray ships them between the driver and the workers, Prefect between tasks; the flows' summaries
are their `to_dict()`. Artifacts themselves (statistics, shards, variant folders, evaluation
JSON) stay on disk: a record says where and what, never carries tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Artifact(Record):
    """A record of a content-keyed cache entry: its key is the entry's name (tasks/cache.py)."""

    path: str

    @property
    def key(self) -> str:
        return Path(self.path).name.removesuffix(".safetensors").removesuffix(".json")


@dataclass(frozen=True)
class BaseModel(Record):
    """A resolved base model: the name workers load it by, its weights hash and FFN layer count."""

    name: str
    sha256: str
    layers: int
    path: str

    @classmethod
    def resolve(cls, model: str) -> BaseModel:
        """A packaged name or a local folder; it must have a tokenizer (the pipeline profiles and
        evaluates on text)."""
        from ffsplit.errors import FFSplitError
        from ffsplit.models.loading import TOKENIZER_FILES
        from ffsplit.models.registry import resolve_model
        from ffsplit.profiling.sequential import count_layers

        if not isinstance(model, str) or not model.strip():
            raise FFSplitError(f"model must be a packaged model name or a folder, got {model!r}")
        ref = resolve_model(model)
        if not any((ref.path / name).is_file() for name in TOKENIZER_FILES):
            raise FFSplitError(
                f"model {model!r} ({ref.path}) has no tokenizer files: the pipeline profiles and "
                "evaluates on text; add the tokenizer to the folder"
            )
        return cls(model, ref.weights_sha256, count_layers(ref.path), str(ref.path))


@dataclass(frozen=True)
class UnitStats(Artifact):
    """One calibration unit's statistics file (tasks/profile.py)."""

    unit: int
    cached: bool
    seconds: float = 0.0
    tokens: int | None = None
    device: str | None = None
    threads: int | None = None
    groups: tuple[tuple[int, int], ...] | None = None  # layer groups, profile_mode layer_groups
    max_group_weights_mb: float | None = None


@dataclass(frozen=True)
class MergedStats(Artifact):
    """The units' statistics merged in unit order, with per-layer scores (tasks/aggregate.py);
    path is the aggregate folder."""

    cached: bool
    seconds: float
    tokens: int
    units: int
    calibration: dict[str, Any]
    summary: dict[str, Any]  # per-layer score summaries, the profile config

    @property
    def stats_path(self) -> str:
        from tasks.aggregate import stats_file

        return str(stats_file(self.path))


@dataclass(frozen=True)
class Statistics(Record):
    """A flow's calibration statistics: the units and their merge (whose key is theirs)."""

    units: tuple[UnitStats, ...]
    merged: MergedStats

    @property
    def key(self) -> str:
        return self.merged.key

    @property
    def stats_path(self) -> str:
        return self.merged.stats_path

    @property
    def cached(self) -> bool:
        return all(u.cached for u in self.units) and self.merged.cached

    @property
    def profile_seconds(self) -> float:
        """Compute time in the units (they run in parallel: more than the stage's wall time)."""
        return sum(u.seconds for u in self.units)


@dataclass(frozen=True)
class Shard(Artifact):
    """A folder of compressed layers (tasks/compress.py)."""

    layers: tuple[int, ...]
    cached: bool
    seconds: float
    dense_bytes: int
    bytes: int
    compress_seconds: float | None  # inside the body, as the shard's own metadata records it
    device: str | None = None  # where the body ran ("cuda" or "cpu"), from the shard's metadata


@dataclass(frozen=True)
class VariantFolder(Artifact):
    """A variant folder, assembled (tasks/assemble.py) or healed (tasks/heal.py)."""

    label: str
    ffn_reduction: float
    dense_ffn_bytes: int
    ffn_bytes: int
    compression_seconds: float | None
    cached: bool
    seconds: float
    heal: dict[str, Any] | None = None  # what healing did: loss, steps, before, after, seconds


@dataclass(frozen=True)
class Evaluation(Artifact):
    """An evaluation record (tasks/evaluate.py): the JSON file and what it holds."""

    cached: bool
    record: dict[str, Any] = field(repr=False)

    @property
    def device(self) -> str | None:
        return self.record.get("device")


@dataclass(frozen=True)
class ObservationRecord(Artifact):
    """An observation record folder (tasks/observation.py) and its headline numbers."""

    model: str
    cached: bool
    seconds: float
    top1_share: float
    ablation: dict[str, Any]


def read_variant(folder: str | Path, cached: bool, seconds: float) -> VariantFolder:
    """The record of a finished variant folder, from its manifest alone."""
    from ffsplit.config import Recipe
    from ffsplit.variant.manifest import read_manifest

    manifest = read_manifest(folder)
    sizes = manifest["sizes"]
    heal = manifest.get("heal")
    return VariantFolder(
        path=str(folder),
        label=Recipe.from_dict(manifest["recipe"]).label,
        ffn_reduction=sizes["ffn_reduction"],
        dense_ffn_bytes=sizes["dense_ffn_bytes"],
        ffn_bytes=sizes["ffn_bytes"],
        compression_seconds=manifest.get("compression_seconds"),
        cached=cached,
        seconds=seconds,
        heal=(
            {k: heal.get(k) for k in ("loss", "steps", "before", "after", "seconds")}
            if isinstance(heal, dict)
            else None
        ),
    )
