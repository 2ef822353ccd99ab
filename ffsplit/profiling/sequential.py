"""Profile a model too large for one worker by layer groups: each step holds consecutive layers.

The chain (what the pipeline runs as one task per step, handing files on):
1. `load_embedding_stage` + `capture_layer_inputs`: run the model up to its first decoder layer and
   record the hidden states entering it, plus the other arguments the model passes to every layer
   (masks, rotary cos/sin, position ids; Gemma 3 passes different ones to sliding and global layers).
2. per group: `load_layer_group` materialises only layers first..last from the safetensors files
   (the rest of the model stays on the meta device), `run_layer_group` runs them on the captured
   hidden states with the same statistics hooks as `profile_model` and returns the hidden states
   entering layer last+1.
`save_layer_inputs` / `load_layer_inputs` carry the hand-off through one safetensors file.
The statistics equal those of `profile_model` on the whole model: same inputs, same batches, same ops.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.adapters import Adapter, get_adapter
from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.profiling.profiler import attach_stat_hooks
from ffsplit.profiling.stats import ModelStats

LAYER_INPUTS_FORMAT = "ffsplit-layer-inputs"
LAYER_INPUTS_FORMAT_VERSION = 1

# JSON form of one layer call: {"args": [...], "kwargs": {...}}; values are JSON scalars, lists,
# {"tensor": name} (a tensor of LayerInputs.tensors), {"tuple": [...]} or {"dict": {...}}.
CallSpec = dict[str, Any]


@dataclass
class LayerInputs:
    """What decoder layer `layer` and every later layer are called with, batch by batch.

    hidden[b] is batch b's hidden states [windows, T, d] entering layer `layer`; calls[b][i] the other
    arguments of layer i for batch b (JSON, tensors by name in `tensors`, shared between layers and
    batches). Batches keep the capture's boundaries so every layer sees the shapes the whole model saw.
    """

    layer: int
    num_layers: int
    hidden: list[Tensor]
    calls: list[dict[int, CallSpec]]
    tensors: dict[str, Tensor]

    @property
    def windows(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    @property
    def window(self) -> int:
        return self.hidden[0].shape[1] if self.hidden else 0

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


class _Interner:
    """Names the tensors of layer arguments, storing equal tensors once (masks repeat per batch)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self._by_id: dict[int, str] = {}
        self._seen: list[Tensor] = []

    def new_forward(self) -> None:
        """Forget identities between forwards (content matching still shares equal tensors)."""
        self._by_id.clear()
        self._seen.clear()

    def add(self, tensor: Tensor) -> str:
        name = self._by_id.get(id(tensor))
        if name is not None:
            return name
        for other_name, other in self.tensors.items():
            if (
                other.shape == tensor.shape
                and other.dtype == tensor.dtype
                and other.device == tensor.device
                and torch.equal(other, tensor)
            ):
                name = other_name
                break
        else:
            name = f"arg.{len(self.tensors)}"
            self.tensors[name] = tensor
        self._by_id[id(tensor)] = name
        self._seen.append(tensor)  # alive, so its id cannot be reused by another tensor
        return name


def _encode(value: Any, interner: _Interner, where: str) -> Any:
    from transformers.cache_utils import Cache

    if isinstance(value, Tensor):
        return {"tensor": interner.add(value)}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FFSplitError(
                f"{where} is {value}: layer arguments must be finite to hand on as JSON"
            )
        return value
    if isinstance(value, Cache):
        return None  # caches are off (use_cache=False); an empty cache object carries nothing
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, interner, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, interner, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, interner, f"{where}.{k}") for k, v in value.items()}}
    raise FFSplitError(
        f"{where} is a {type(value).__name__}, which cannot be handed to the next layer group; "
        "this architecture cannot be profiled by layer groups (profile it whole)"
    )


def _decode(value: Any, tensors: dict[str, Tensor], device: torch.device) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, device) for v in value]
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]].to(device)
        if "tuple" in value:
            return tuple(_decode(v, tensors, device) for v in value["tuple"])
        return {k: _decode(v, tensors, device) for k, v in value["dict"].items()}
    return value


class _Captured(Exception):
    """Raised by the last layer's recorder to end a capture forward early (never escapes)."""


class _Recorder(nn.Module):
    """Stands in for one decoder layer during capture: records its arguments, skips its work."""

    def __init__(
        self, inner: nn.Module, index: int, sink: Callable[[int, tuple, dict], None], last: bool
    ):
        super().__init__()
        self.__dict__["_inner"] = inner  # not a submodule: the recorder owns no weights
        self.index = index
        self.sink = sink
        self.last = last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # models may read layer attributes (e.g. attention_type) to pick a layer's arguments
            return getattr(self.__dict__["_inner"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.sink(self.index, args, kwargs)
        if self.last:
            raise _Captured
        return args[0] if args else kwargs["hidden_states"]


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, Tensor) and not weight.is_meta:
        return weight.device
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    raise FFSplitError(
        f"{type(model).__name__}: every parameter is on the meta device; load weights first"
    )


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    windows: Tensor,
    adapter: Adapter | None = None,
    *,
    batch_size: int | None = None,
) -> LayerInputs:
    """Hidden states entering layer 0 and every layer's other arguments, for token windows [n, T].

    Only the embedding stage runs: each decoder layer is swapped for a recorder for the duration
    (restored after), so the layers may stay on the meta device (`load_embedding_stage`). Batches of
    `batch_size` windows (default all) must match `ProfileConfig.batch_size` for bitwise agreement
    with `profile_model`, since kernels may round differently at other batch shapes.
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise FFSplitError(
            f"windows must be a non-empty [n, T] tensor of token ids, got {tuple(windows.shape)}"
        )
    adapter = adapter or get_adapter(model)
    layers = model.get_submodule(adapter.layers_path(model))
    num_layers = len(layers)
    if num_layers == 0:
        raise FFSplitError(f"{type(model).__name__} has no decoder layers to profile")
    device = _input_device(model)
    batch_size = batch_size or windows.shape[0]
    interner = _Interner()
    hidden: list[Tensor] = []
    calls: list[dict[int, CallSpec]] = []
    current: dict[int, CallSpec] = {}

    def sink(index: int, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        rest = list(args[1:])
        first = args[0] if args else kwargs.pop("hidden_states")
        if index == 0:
            hidden.append(first.detach())
        where = f"layer {index} argument"
        current[index] = {
            "args": [_encode(v, interner, f"{where} {i + 1}") for i, v in enumerate(rest)],
            "kwargs": {k: _encode(v, interner, f"{where} {k!r}") for k, v in kwargs.items()},
        }

    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, sink, last=i == num_layers - 1)
    try:
        for start in range(0, windows.shape[0], batch_size):
            current = {}
            interner.new_forward()
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
            if sorted(current) != list(range(num_layers)):
                raise FFSplitError(
                    f"{type(model).__name__}: the forward called layers {sorted(current)} of "
                    f"{num_layers}; profile this model whole instead of by layer groups"
                )
            calls.append(current)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs(0, num_layers, hidden, calls, interner.tensors)


def _check_group(first: int, last: int, num_layers: int) -> None:
    if not 0 <= first <= last < num_layers:
        raise FFSplitError(
            f"layer group {first}..{last} is not within the model's {num_layers} layers "
            f"(need 0 <= first <= last <= {num_layers - 1})"
        )


@torch.no_grad()  # not inference_mode: the statistics must stay ordinary tensors
def run_layer_group(
    model: nn.Module,
    first: int,
    last: int,
    inputs: LayerInputs,
    config: ProfileConfig | None = None,
    adapter: Adapter | None = None,
    *,
    meta: dict[str, Any] | None = None,
) -> tuple[ModelStats, LayerInputs]:
    """FFN statistics of layers first..last, and the hidden states entering layer last+1.

    `model` is the whole model or a skeleton with at least layers first..last loaded
    (`load_layer_group`); the layers run on `inputs` batch by batch with their recorded arguments.
    """
    config = config or ProfileConfig()
    adapter = adapter or get_adapter(model)
    layers = model.get_submodule(adapter.layers_path(model))
    if len(layers) != inputs.num_layers:
        raise FFSplitError(
            f"layer inputs are for a model of {inputs.num_layers} layers, this one has {len(layers)}"
        )
    _check_group(first, last, len(layers))
    if inputs.layer != first:
        raise FFSplitError(
            f"layer inputs enter layer {inputs.layer}, not {first}: run the groups in order"
        )
    for i in range(first, last + 1):
        if any(t.is_meta for t in layers[i].parameters()):
            raise FFSplitError(
                f"layer {i} has no weights (meta device): load it with load_layer_group"
            )
    device = next(layers[first].parameters()).device
    hooks = attach_stat_hooks(model, adapter, config, range(first, last + 1))
    started = time.perf_counter()
    out_hidden: list[Tensor] = []
    try:
        for hidden, calls in zip(inputs.hidden, inputs.calls, strict=True):
            h = hidden.to(device)
            for i in range(first, last + 1):
                call = calls[i]
                args = _decode(call["args"], inputs.tensors, device)
                kwargs = {k: _decode(v, inputs.tensors, device) for k, v in call["kwargs"].items()}
                out = layers[i](h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
            out_hidden.append(h)
    finally:
        hooks.remove()
    info = {
        "tokens": inputs.tokens,
        "windows": inputs.windows,
        "window": inputs.window,
        "profile": config.to_dict(),
        "seconds": time.perf_counter() - started,
        "layers": [first, last],
        **(meta or {}),
    }
    stats = ModelStats(hooks.collected(), info)
    rest = [{i: c for i, c in calls.items() if i > last} for calls in inputs.calls]
    used = {name for calls in rest for c in calls.values() for name in _tensor_names(c)}
    tensors = {name: t for name, t in inputs.tensors.items() if name in used}
    return stats, LayerInputs(last + 1, inputs.num_layers, out_hidden, rest, tensors)


def _tensor_names(value: Any) -> Iterable[str]:
    if isinstance(value, list):
        for v in value:
            yield from _tensor_names(v)
    elif isinstance(value, dict):
        if isinstance(value.get("tensor"), str):
            yield value["tensor"]
        else:
            for v in value.values():
                yield from _tensor_names(v)


def save_layer_inputs(inputs: LayerInputs, path: str | Path) -> Path:
    """One safetensors file (hidden states per batch + argument tensors), arguments as JSON metadata."""
    from safetensors.torch import save_file

    from ffsplit.files import atomic_path

    tensors = {f"hidden.{b}": h.detach().cpu().contiguous() for b, h in enumerate(inputs.hidden)}
    tensors.update({name: t.detach().cpu().contiguous() for name, t in inputs.tensors.items()})
    meta = {
        "format": LAYER_INPUTS_FORMAT,
        "format_version": str(LAYER_INPUTS_FORMAT_VERSION),
        "layer": str(inputs.layer),
        "num_layers": str(inputs.num_layers),
        "batches": str(len(inputs.hidden)),
        "calls": json.dumps([{str(i): c for i, c in calls.items()} for calls in inputs.calls]),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_layer_inputs(path: str | Path, device: str | torch.device = "cpu") -> LayerInputs:
    """Read a file of `save_layer_inputs` (format and references checked)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FFSplitError(f"layer inputs file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise FFSplitError(
            f"{path}: not a readable safetensors layer inputs file ({exc})"
        ) from None
    if header.get("format") != LAYER_INPUTS_FORMAT:
        raise FFSplitError(
            f"{path}: not an ffsplit layer inputs file (format={header.get('format')!r})"
        )
    if int(header.get("format_version", "0")) > LAYER_INPUTS_FORMAT_VERSION:
        raise FFSplitError(
            f"{path}: layer inputs format {header.get('format_version')} is newer than this ffsplit "
            f"reads ({LAYER_INPUTS_FORMAT_VERSION}); upgrade ffsplit"
        )
    try:
        batches = int(header["batches"])
        calls = [{int(i): c for i, c in b.items()} for b in json.loads(header["calls"])]
        layer, num_layers = int(header["layer"]), int(header["num_layers"])
        hidden = [tensors.pop(f"hidden.{b}") for b in range(batches)]
    except (KeyError, ValueError, AttributeError) as exc:
        raise FFSplitError(
            f"{path}: layer inputs file is incomplete ({exc!r}); re-run the previous step"
        ) from None
    missing = {n for c in calls for spec in c.values() for n in _tensor_names(spec)} - set(tensors)
    if len(calls) != batches or missing:
        raise FFSplitError(f"{path}: layer inputs file is inconsistent; re-run the previous step")
    return LayerInputs(layer, num_layers, hidden, calls, tensors)


# ---- loading parts of a model ---------------------------------------------------------------------


def _model_folder(name_or_path: str | Path) -> Path:
    """A local folder as given (no weight hashing: a big model is read once per group), else a name."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    from ffsplit.models.registry import resolve_model

    return resolve_model(name_or_path).path


def _build_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model class of `load_model`, built on the meta device: structure without memory."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ffsplit.models.loading import is_causal_lm

    try:
        config = AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as error:
        raise FFSplitError(f"could not read the model config in {folder}: {error}") from error
    model_class = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with torch.device("meta"):
        model = model_class.from_config(config, dtype=dtype)
    return model.eval()  # dropout off, as load_model leaves it


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it (sharded or single-file folders)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FFSplitError(f"model folder {folder} has no *.safetensors weights")
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            out.update({name: file for name in f.keys()})
    return out


def _file_key(name: str, available: dict[str, Path], prefix: str) -> str:
    """The checkpoint key of a parameter, allowing the base-model prefix to be present or absent."""
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
    for key in candidates:
        if key in available:
            return key
    raise FFSplitError(
        f"weights have no tensor {name!r}: the folder's checkpoint uses other names; "
        "re-save it with save_pretrained (safetensors) before profiling by layer groups"
    )


def _materialise(
    model: nn.Module, folder: Path, selected: Callable[[str], bool], device: str | torch.device
) -> nn.Module:
    """Give the tensors whose names pass `selected` real storage and their checkpoint values.

    Non-persistent buffers (rotary inv_freq, Gemma's embed_scale, BERT's position_ids) are not in
    the checkpoint: the model's own `_init_weights` recomputes them, as `from_pretrained` does.
    """
    from safetensors import safe_open

    owners: dict[str, tuple[nn.Module, str, bool]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is None or not selected(prefix + attr):
                continue
            persistent = (
                attr in module._parameters or attr not in module._non_persistent_buffers_set
            )
            owners[prefix + attr] = (module, attr, persistent)
    # id(meta tensor) -> (it, its real replacement): tied tensors stay tied; holding the meta
    # tensor keeps its id from being reused by a later tensor
    replaced: dict[int, tuple[Tensor, Tensor]] = {}
    for module, attr, _ in owners.values():
        old = module._parameters.get(attr)
        is_param = old is not None
        old = old if is_param else module._buffers[attr]
        if not old.is_meta:
            continue  # already replaced through another name of the same module
        if id(old) in replaced:
            new = replaced[id(old)][1]
        else:
            new = torch.empty_like(old, device=device)
            if is_param:
                new = nn.Parameter(new, requires_grad=False)
            replaced[id(old)] = (old, new)
        (module._parameters if is_param else module._buffers)[attr] = new
    with torch.no_grad():
        computed = {id(m): m for m, _, persistent in owners.values() if not persistent}
        for module, attr, persistent in owners.values():
            if not persistent:
                _fill_sentinel(getattr(module, attr))
        for module in computed.values():
            model._init_weights(module)  # type: ignore[operator]
        for name, (module, attr, persistent) in owners.items():
            if not persistent and _has_sentinel(getattr(module, attr)):
                raise FFSplitError(
                    f"{type(model).__name__}: buffer {name!r} is not in the checkpoint and the model "
                    "does not compute it on init; profile this model whole instead of by layer groups"
                )
        available = _weight_files(folder)
        base_prefix = getattr(model, "base_model_prefix", "")
        by_file: dict[Path, list[tuple[str, Tensor]]] = {}
        for name, (module, attr, persistent) in owners.items():
            if persistent:
                key = _file_key(name, available, base_prefix)
                by_file.setdefault(available[key], []).append((key, getattr(module, attr)))
        for file, targets in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key, target in targets:
                    value = f.get_tensor(key)
                    if value.shape != target.shape:
                        raise FFSplitError(
                            f"{file.name}: tensor {key!r} has shape {tuple(value.shape)}, the model "
                            f"expects {tuple(target.shape)}; the folder's config does not match its weights"
                        )
                    target.copy_(value)
    return model


def _fill_sentinel(t: Tensor) -> None:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).min)


def _has_sentinel(t: Tensor) -> bool:
    if t.is_floating_point():
        return bool(t.isnan().any())
    return t.dtype != torch.bool and bool((t == torch.iinfo(t.dtype).min).any())


def _layers_prefix(model: nn.Module, adapter: Adapter) -> str:
    return adapter.layers_path(model) + "."


def load_embedding_stage(
    name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """The model with everything but its decoder layers and LM head loaded (those stay on meta).

    Enough for `capture_layer_inputs`: embeddings, positions, rotary tables, small norms.
    """
    folder = _model_folder(name_or_path)
    model = _build_skeleton(folder, dtype)
    layers = _layers_prefix(model, get_adapter(model))
    head = _output_embeddings_prefix(model)

    def selected(name: str) -> bool:
        return not name.startswith(layers) and not (head and name.startswith(head))

    return _materialise(model, folder, selected, device)


def _output_embeddings_prefix(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    return None


def load_layer_group(
    name_or_path: str | Path,
    first: int,
    last: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The model with only decoder layers first..last loaded; every other tensor stays on meta.

    Peak memory is about the group's weights: only their tensors are read from the checkpoint.
    """
    folder = _model_folder(name_or_path)
    model = _build_skeleton(folder, dtype)
    adapter = get_adapter(model)
    prefix = _layers_prefix(model, adapter)
    _check_group(first, last, len(model.get_submodule(prefix[:-1])))
    wanted = tuple(f"{prefix}{i}." for i in range(first, last + 1))
    return _materialise(model, folder, lambda name: name.startswith(wanted), device)


def count_layers(name_or_path: str | Path) -> int:
    """Number of decoder layers of a model folder or known name, read from its config alone."""
    from transformers import AutoConfig

    folder = _model_folder(name_or_path)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    return int(config.get_text_config().num_hidden_layers)


def layer_groups(num_layers: int, group_size: int) -> list[tuple[int, int]]:
    """Consecutive (first, last) groups of `group_size` layers (the last group may be shorter)."""
    if not isinstance(group_size, int) or group_size < 1:
        raise FFSplitError(f"layer group size must be a positive integer, got {group_size!r}")
    return [(i, min(i + group_size, num_layers) - 1) for i in range(0, num_layers, group_size)]


def join_layer_groups(parts: Sequence[ModelStats]) -> ModelStats:
    """The statistics of a whole model from those of its layer groups (disjoint layers, same tokens)."""
    if not parts:
        raise FFSplitError("no layer group statistics to join")
    layers: dict[int, Any] = {}
    for part in parts:
        overlap = set(layers) & set(part.layers)
        if overlap:
            raise FFSplitError(f"layer groups overlap at layers {sorted(overlap)}; each layer once")
        if part.tokens != parts[0].tokens:
            raise FFSplitError(
                f"layer groups saw different tokens ({parts[0].tokens} vs {part.tokens}); "
                "profile every group on the same windows"
            )
        layers.update(part.layers)
    meta = {k: v for k, v in parts[0].meta.items() if k != "layers"}
    meta["seconds"] = sum(float(p.meta.get("seconds", 0.0)) for p in parts)
    meta["layer_groups"] = [p.meta.get("layers") for p in parts]
    return ModelStats(dict(sorted(layers.items())), meta)


def profile_by_layer_groups(
    name_or_path: str | Path,
    windows: Tensor,
    config: ProfileConfig | None = None,
    group_size: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    work_dir: str | Path | None = None,
    meta: dict[str, Any] | None = None,
) -> ModelStats:
    """The whole chain in one process, never holding more than one group's layers.

    With `work_dir`, every hand-off goes through a file as it does between pipeline tasks.
    """
    config = config or ProfileConfig()
    num_layers = count_layers(name_or_path)
    groups = layer_groups(num_layers, group_size)
    stage = load_embedding_stage(name_or_path, dtype, device)
    inputs = capture_layer_inputs(stage, windows, batch_size=config.batch_size)
    del stage
    parts = []
    for first, last in groups:
        if work_dir is not None:
            path = save_layer_inputs(inputs, Path(work_dir) / f"layer-inputs-{first}.safetensors")
            inputs = load_layer_inputs(path)
        model = load_layer_group(name_or_path, first, last, dtype, device)
        stats, inputs = run_layer_group(model, first, last, inputs, config, meta=meta)
        parts.append(stats)
        del model
        gc.collect()
    return join_layer_groups(parts)
