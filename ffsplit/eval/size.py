"""Parameters and storage bytes of a model, whole and for its FFN projections.

Counting rule (docs/design.md, "Budget"): floating-point weights count 16 bits each (2 bytes, the
serving dtype) whatever their dtype in memory, so an fp32 model on CPU and its bf16 file report the
same size. Integer tensors count at their real element size.

Modules that expose ``nbytes()`` (the ffsplit split parts) know their own storage (packed codes at
their bit width, scales and zeros at 16 bits): their bytes are ``nbytes()`` and the walk does not
descend into them. Their parameter count is ``parameter_count()`` when they define it;
otherwise the elements of their floating-point tensors (parameters and persistent buffers) plus one
parameter per code, where a module with an integer ``bits`` attribute packs ``element_bits // bits``
codes per integer element (a plain integer tensor counts one parameter per element).

Shared tensors (tied input and output embeddings) and shared modules are counted once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ffsplit.errors import FFSplitError

FLOAT_BYTES = 2  # float weights are counted at 16 bits, the serving dtype (design.md, "Budget")


@dataclass(frozen=True)
class SizeReport:
    """Parameters and bytes of a model; FFN and embedding shares are subsets of the totals."""

    total_params: int
    total_bytes: int
    ffn_params: int
    ffn_bytes: int
    embedding_params: int
    embedding_bytes: int
    ffn_modules: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise FFSplitError(f"SizeReport.{name} is negative ({value}); counts must be >= 0")
        if self.ffn_bytes > self.total_bytes or self.embedding_bytes > self.total_bytes:
            raise FFSplitError("SizeReport: FFN or embedding bytes exceed the model's total bytes")

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    @property
    def non_embedding_bytes(self) -> int:
        return self.total_bytes - self.embedding_bytes

    @property
    def ffn_byte_share(self) -> float:
        """FFN bytes over all bytes (0 for an empty model)."""
        return self.ffn_bytes / self.total_bytes if self.total_bytes else 0.0

    def to_dict(self) -> dict[str, int | float]:
        """Plain dict (fields and derived shares) for JSON, manifests and MLflow metrics."""
        out: dict[str, int | float] = dict(asdict(self))
        out["non_embedding_params"] = self.non_embedding_params
        out["non_embedding_bytes"] = self.non_embedding_bytes
        out["ffn_byte_share"] = self.ffn_byte_share
        return out


@dataclass(frozen=True)
class _Item:
    """One counted unit: a plain tensor, or a whole module that reports its own nbytes()."""

    key: tuple[str, int]
    params: int
    nbytes: int


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor.numel() * FLOAT_BYTES * (2 if tensor.is_complex() else 1)
    return tensor.numel() * tensor.element_size()


def _persistent_buffers(module: nn.Module) -> Iterator[torch.Tensor]:
    skip = getattr(module, "_non_persistent_buffers_set", set())
    for name, buf in module.named_buffers(recurse=False):
        if buf is not None and name not in skip:
            yield buf


def _code_count(module: nn.Module, tensor: torch.Tensor) -> int:
    bits = getattr(module, "bits", None)
    if (
        isinstance(bits, int)
        and not isinstance(bits, bool)
        and 1 <= bits <= 8 * tensor.element_size()
    ):
        return tensor.numel() * (8 * tensor.element_size() // bits)
    return tensor.numel()


def _self_sized_params(module: nn.Module, seen: set[int]) -> int:
    """Parameter count of a module that reports nbytes() (rule in the module docstring)."""
    equivalent = getattr(module, "parameter_count", None)
    if callable(equivalent):
        return int(equivalent())
    count = 0
    for tensor in [*module.parameters(recurse=False), *_persistent_buffers(module)]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.is_floating_point() or tensor.is_complex():
            count += tensor.numel()
        else:
            count += _code_count(module, tensor)
    for child in module.children():
        count += _self_sized_params(child, seen)
    return count


def _items(module: nn.Module, path: str = "") -> Iterator[_Item]:
    """Countable units under a module: self-sized modules whole, otherwise parameters one by one."""
    nbytes = getattr(module, "nbytes", None)
    if callable(nbytes):
        value = int(nbytes())
        if value < 0:
            raise FFSplitError(
                f"module {path or type(module).__name__} reports nbytes()={value} < 0"
            )
        yield _Item(("module", id(module)), _self_sized_params(module, set()), value)
        return
    for param in module.parameters(recurse=False):
        yield _Item(("tensor", id(param)), param.numel(), _tensor_bytes(param))
    for name, child in module.named_children():
        yield from _items(child, f"{path}.{name}" if path else name)


def _count(modules: Sequence[nn.Module], allowed: dict[tuple[str, int], _Item]) -> tuple[int, int]:
    """Sum params and bytes over the modules, each unit once; every unit must belong to the model."""
    seen: set[tuple[str, int]] = set()
    params = nbytes = 0
    for module in modules:
        for item in _items(module):
            if item.key in seen:
                continue
            if item.key not in allowed:
                raise FFSplitError(
                    f"{type(module).__name__} passed to model_size is not a whole part of the model "
                    "(it sits inside a module that reports nbytes()); pass that module instead"
                )
            seen.add(item.key)
            params += item.params
            nbytes += item.nbytes
    return params, nbytes


def _hf_embeddings(model: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        method = getattr(model, getter, None)
        if not callable(method):
            continue
        try:
            module = method()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(module, nn.Module):
            found.append(module)
    return found


def model_size(
    model: nn.Module,
    ffn_modules: Sequence[nn.Module] | None = None,
    embedding_modules: Sequence[nn.Module] | None = None,
) -> SizeReport:
    """Count parameters and storage bytes of a model, its FFN projections and its embeddings.

    ffn_modules are the FFN projections (or FFN containers) as the adapter names them; None means
    no FFN share is reported. embedding_modules default to the HF input and output embeddings
    (``get_input_embeddings()``/``get_output_embeddings()``); a tied head is counted once.
    """
    all_items: dict[tuple[str, int], _Item] = {}
    for item in _items(model):
        all_items.setdefault(item.key, item)
    total_params = sum(item.params for item in all_items.values())
    total_bytes = sum(item.nbytes for item in all_items.values())

    ffn_list = list(ffn_modules or [])
    members = {id(m) for m in model.modules()}
    for index, module in enumerate(ffn_list):
        if id(module) not in members:
            raise FFSplitError(
                f"ffn_modules[{index}] ({type(module).__name__}) is not a submodule of the model; "
                "pass the model's own FFN projections (adapter.ffns(model) paths)"
            )
    ffn_params, ffn_bytes = _count(ffn_list, all_items)

    embeddings = list(embedding_modules) if embedding_modules is not None else _hf_embeddings(model)
    for index, module in enumerate(embeddings):
        if id(module) not in members:
            raise FFSplitError(
                f"embedding_modules[{index}] ({type(module).__name__}) is not a submodule of the model"
            )
    embedding_params, embedding_bytes = _count(embeddings, all_items)

    return SizeReport(
        total_params=total_params,
        total_bytes=total_bytes,
        ffn_params=ffn_params,
        ffn_bytes=ffn_bytes,
        embedding_params=embedding_params,
        embedding_bytes=embedding_bytes,
        ffn_modules=len({id(m) for m in ffn_list}),
    )


def size_reduction(reference: SizeReport, variant: SizeReport) -> dict[str, float]:
    """Fractions saved by a variant against its base model: 1 - variant / reference.

    ``ffn_reduction`` is the budget quantity of design.md (all FFN projections, weights and biases).
    """
    if reference.ffn_bytes <= 0 or reference.total_bytes <= 0:
        raise FFSplitError(
            "size_reduction: the reference report has no FFN bytes; "
            "call model_size(model, ffn_modules=...) with the FFN projections"
        )
    return {
        "ffn_reduction": 1.0 - variant.ffn_bytes / reference.ffn_bytes,
        "model_reduction": 1.0 - variant.total_bytes / reference.total_bytes,
        "ffn_param_reduction": 1.0 - variant.ffn_params / reference.ffn_params,
        "model_param_reduction": 1.0 - variant.total_params / reference.total_params,
    }
