"""Heal a compressed model: a short distillation against the dense model (ffsplit.heal), in a
compress job or on a saved variant."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from ffsplit.adapters import Adapter
from ffsplit.config import (
    HealConfig,
    Recipe,
)
from ffsplit.errors import FFSplitError
from ffsplit.jobs.common import (
    Progress,
    _adapter_of,
    _require_tokenizer,
    _stage,
    checked_output,
    is_variant,
)
from ffsplit.variant import load_variant, save_variant
from ffsplit.variant.manifest import MANIFEST, WEIGHTS


def heal_model(
    dense: nn.Module,
    student: nn.Module,
    tokenizer: Any,
    config: HealConfig,
    adapter: Adapter,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Heal a compressed model in place on the heal config's calibration windows; the manifest's
    'heal' entry (report plus the record of the text it saw)."""
    from ffsplit.data.windows import calibration_windows
    from ffsplit.heal import heal

    windows, ref = calibration_windows(tokenizer, config.corpus, config.tokens, config.window)
    report = heal(
        dense, student, windows, config, adapter=adapter, progress=_stage(progress, "heal")
    )
    return {**report.to_dict(), "calibration": ref.to_dict()}


def _heal_summary(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "heal_seconds": entry["seconds"],
        "heal_loss_before": entry["before"],
        "heal_loss_after": entry["after"],
    }


# Keys new_manifest / save_variant write themselves; the rest of a manifest is 'extra' that a
# re-saved (healed) variant carries over.
_MANIFEST_OWN_KEYS = frozenset(
    {
        "format",
        "format_version",
        "ffsplit_version",
        "git_commit",
        "created",
        "base_model",
        "adapter",
        "architecture",
        "recipe",
        "calibration",
        "storage_dtype",
        "tied",
        "layers",
        "sizes",
        "compression_seconds",
        "files",
    }
)


def _compressed_layers(
    folder: Path, manifest: dict[str, Any], net: nn.Module, adapter: Adapter
) -> dict[int, Any]:
    """The per-layer compression results of a saved variant (heavy sets, neuron orders, reports,
    the modules now in `net`), as save_variant takes them."""
    from safetensors.torch import load_file

    from ffsplit.compress.results import CompressedLayer, LayerReport
    from ffsplit.variant.manifest import NEURONS

    neurons = load_file(str(folder / NEURONS)) if (folder / NEURONS).is_file() else {}
    layers: dict[int, Any] = {}
    for handle in adapter.ffns(net):
        entry = manifest["layers"].get(str(handle.layer), {})
        heavy = neurons.get(f"layer.{handle.layer}.heavy")
        order = neurons.get(f"layer.{handle.layer}.order")
        if heavy is None or order is None or "report" not in entry:
            raise FFSplitError(
                f"{folder}: layer {handle.layer} has no compression record (neurons and report); "
                "heal a variant written by ffsplit compress"
            )
        fields = dict(entry["report"])
        if fields.get("bits") is not None:
            fields["bits"] = {int(k): v for k, v in fields["bits"].items()}
        try:
            report = LayerReport(**fields)
        except TypeError as exc:
            raise FFSplitError(
                f"{folder}: layer {handle.layer} report is malformed ({exc})"
            ) from None
        modules = (
            net.get_submodule(handle.up_path),
            None if handle.gate_path is None else net.get_submodule(handle.gate_path),
            net.get_submodule(handle.down_path),
        )
        layers[handle.layer] = CompressedLayer(handle.layer, modules, heavy, order, report)
    return layers


def _teacher(
    base: dict[str, Any], dense: tuple[nn.Module, str] | None, folder: Path, device: str
) -> nn.Module:
    """The dense base model a variant was made from (loaded here unless given), hash checked."""
    from ffsplit.models.loading import load_model

    if dense is None:
        teacher, _, ref = load_model(base.get("path") or base["name"], device=device)
        actual = ref.weights_sha256
    else:
        teacher, actual = dense
    expected = base.get("weights_sha256")
    if expected and actual != expected:
        raise FFSplitError(
            f"base model weights (sha256 {str(actual)[:12]}...) are not the ones {folder} was made "
            f"from ({str(expected)[:12]}...)"
        )
    return teacher


def heal_job(
    variant: str | Path,
    config: HealConfig,
    out: str | Path,
    *,
    dense: tuple[nn.Module, str] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Heal a saved (unhealed) variant against its base model and write a new variant folder.

    The new manifest's recipe carries the heal config and its 'heal' entry the report; the
    structure, sizes and heavy sets are those of the input variant. dense: (base model, its
    weights sha256) already loaded (read only; the hash is checked against the manifest), else
    the base model is loaded here.
    """
    from ffsplit.compress.results import CompressionReport

    started = time.perf_counter()
    out = checked_output(out, overwrite, "output folder")
    if not config.enabled:
        raise FFSplitError("heal.steps is 0: healing is off, nothing to write")
    folder = Path(variant)
    if not is_variant(folder):
        raise FFSplitError(f"{folder}: not an ffsplit variant (no {MANIFEST}); compress first")
    net, tokenizer, manifest = load_variant(folder, device=device)
    _require_tokenizer(tokenizer, folder, "healing distills on calibration text")
    recipe = Recipe.from_dict(manifest["recipe"], where=f"{folder / MANIFEST}: recipe")
    if recipe.heal.enabled:
        raise FFSplitError(f"{folder}: this variant is already healed ({recipe.label})")
    try:
        healed = recipe.replace(heal=config)
    except FFSplitError as exc:
        raise FFSplitError(f"{folder}: {exc}") from None
    base = manifest["base_model"]
    teacher = _teacher(base, dense, folder, device)
    adapter = _adapter_of(net, folder)
    layers = _compressed_layers(folder, manifest, net, adapter)
    entry = heal_model(teacher, net, tokenizer, config, adapter, progress)
    reports = [layers[i].report for i in sorted(layers)]
    seconds = float(manifest.get("compression_seconds") or 0.0)
    report = CompressionReport.of(healed.to_dict(), reports, seconds)
    extra = {k: v for k, v in manifest.items() if k not in _MANIFEST_OWN_KEYS}
    extra["heal"] = {
        **entry,
        "from_variant": {"path": str(folder), "weights_sha256": manifest["files"].get(WEIGHTS)},
    }
    save_variant(
        net,
        tokenizer,
        out,
        adapter=adapter,
        base_model=base,
        report=report,
        layers=layers,
        calibration=manifest.get("calibration"),
        extra=extra,
        overwrite=overwrite,
    )
    return {
        "path": str(out),
        "label": healed.label,
        "ffn_reduction": report.ffn_reduction,
        "dense_ffn_bytes": report.dense_ffn_bytes,
        "ffn_bytes": report.ffn_bytes,
        **_heal_summary(entry),
        "seconds": time.perf_counter() - started,
    }
