"""The adapter contract: where each architecture keeps its FFN, in one canonical form.

Everything outside ffsplit/adapters/ is architecture-agnostic: it sees FFNs only as FFNHandle +
FFNWeights (nn.Linear convention, out x in) and swaps projections through Adapter.replace().
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ffsplit.errors import FFSplitError


@dataclass(frozen=True)
class FFNWeights:
    """One FFN in canonical form: m neurons, hidden size d (method.md, definitions)."""

    up: Tensor  # [m, d]
    gate: Tensor | None  # [m, d], gated FFNs only
    down: Tensor  # [d, m]
    up_bias: Tensor | None = None  # [m]
    gate_bias: Tensor | None = None  # [m]
    down_bias: Tensor | None = None  # [d]

    @property
    def neurons(self) -> int:
        return self.up.shape[0]

    @property
    def hidden(self) -> int:
        return self.up.shape[1]

    @property
    def gated(self) -> bool:
        return self.gate is not None


@dataclass(frozen=True)
class FFNHandle:
    """Where one FFN lives in a model: module paths relative to the model root."""

    layer: int
    path: str  # the module that holds the FFN (an MLP block, or the decoder layer for OPT/BERT)
    up_path: str
    gate_path: str | None
    down_path: str
    activation: Callable[[Tensor], Tensor]

    @property
    def gated(self) -> bool:
        return self.gate_path is not None

    @property
    def projection_paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.up_path, self.gate_path, self.down_path) if p is not None)


class Adapter:
    """Declarative adapter: subclasses name the layer list and the projections inside a layer.

    Projections are read into nn.Linear convention; `transposed` marks GPT-2's Conv1D (weight [in, out]).
    Replacement modules always compute x @ W.T + b, so a swapped Conv1D behaves identically.
    """

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    # Candidate paths of the layer list, first match wins (with and without the LM head wrapper).
    layer_paths: ClassVar[tuple[str, ...]]
    up: ClassVar[str]  # relative to one layer
    gate: ClassVar[str | None] = None
    down: ClassVar[str]
    activation: ClassVar[str]  # attribute path, relative to one layer, of the activation module
    ffn: ClassVar[str] = ""  # the FFN container relative to one layer ("" = the layer itself)
    transposed: ClassVar[bool] = False
    # How the FFN computes, for fused execution (ffsplit/split/fused.py): "gated_mlp" = the
    # container at `ffn` computes exactly down(act(gate(x)) * up(x)) and may be replaced whole;
    # "up_act_down" = the enclosing forward applies up, the `activation` module, then down.
    # None = infer (gated -> gated_mlp, else up_act_down); every fused swap is checked on a probe.
    ffn_dataflow: ClassVar[str | None] = None

    def layers_path(self, model: nn.Module) -> str:
        for path in self.layer_paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList):
                return path
        raise FFSplitError(
            f"{type(model).__name__}: no layer list at {', '.join(self.layer_paths)} "
            f"(adapter '{self.name}'); the model does not have the expected layout"
        )

    def ffns(self, model: nn.Module) -> list[FFNHandle]:
        root = self.layers_path(model)
        layers = model.get_submodule(root)
        handles = []
        for i, layer in enumerate(layers):
            prefix = f"{root}.{i}."
            handles.append(
                FFNHandle(
                    layer=i,
                    path=(prefix + self.ffn).rstrip("."),
                    up_path=prefix + self.up,
                    gate_path=prefix + self.gate if self.gate else None,
                    down_path=prefix + self.down,
                    activation=layer.get_submodule(self.activation),
                )
            )
        return handles

    def _linear(self, module: nn.Module) -> tuple[Tensor, Tensor | None]:
        """(weight [out, in], bias) of an original or already swapped projection."""
        from ffsplit.split.parts import LinearPart  # local: split imports adapters' types

        if isinstance(module, LinearPart):
            return module.dense_weight(), module.bias_or_none()
        weight = module.weight
        if self.transposed and not isinstance(module, nn.Linear):
            weight = weight.t()
        return weight.detach(), None if module.bias is None else module.bias.detach()

    def weights(self, model: nn.Module, handle: FFNHandle) -> FFNWeights:
        up, up_bias = self._linear(model.get_submodule(handle.up_path))
        gate = gate_bias = None
        if handle.gate_path is not None:
            gate, gate_bias = self._linear(model.get_submodule(handle.gate_path))
        down, down_bias = self._linear(model.get_submodule(handle.down_path))
        return FFNWeights(up, gate, down, up_bias, gate_bias, down_bias)

    def replace(
        self,
        model: nn.Module,
        handle: FFNHandle,
        *,
        up: nn.Module,
        down: nn.Module,
        gate: nn.Module | None = None,
    ) -> None:
        """Swap the FFN's projections in place; the model's forward is untouched."""
        if (gate is None) != (handle.gate_path is None):
            raise ValueError(f"layer {handle.layer}: gate given for a non-gated FFN or missing")
        _set_module(model, handle.up_path, up)
        _set_module(model, handle.down_path, down)
        if gate is not None and handle.gate_path is not None:
            _set_module(model, handle.gate_path, gate)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    ref = next(iter(old.parameters()), None) if isinstance(old, nn.Module) else None
    if ref is not None:
        module = module.to(device=ref.device)
    setattr(parent, name, module)


def architecture_of(model: nn.Module) -> str:
    """The HF architecture name (config.architectures[0], else the class name)."""
    config = getattr(model, "config", None)
    names = getattr(config, "architectures", None) or []
    return names[0] if names else type(model).__name__


@torch.no_grad()
def dense_ffn(weights: FFNWeights, activation: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Reference FFN from canonical weights (tests and compressors' error checks)."""
    h = nn.functional.linear(x, weights.up, weights.up_bias)
    if weights.gate is not None:
        h = activation(nn.functional.linear(x, weights.gate, weights.gate_bias)) * h
    else:
        h = activation(h)
    return nn.functional.linear(h, weights.down, weights.down_bias)
