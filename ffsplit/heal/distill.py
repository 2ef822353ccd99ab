"""Healing: a short distillation of the compressed FFNs against the dense model (issue 6).

Post-training compression alone loses much of the quality at 30-50% FFN reduction; a few hundred
optimizer steps on calibration text recover a good part of it. Two losses (HealConfig.loss):

- 'local': each FFN alone learns to reproduce the dense FFN's output on the dense model's FFN
  inputs (relative squared error). One FFN forward and backward per step, layers independent (a
  layer's result does not depend on which other layers are healed, or in which order).
- 'kl': all FFNs at once learn the dense model's next-token distribution (KL(dense || student)
  over every position). A full teacher forward and student forward and backward per step.

Only float parts train (low-rank factors; dense heavy or kept blocks with train_dense); quantized
codes never do, and the structure (ranks, neuron sets, bytes) never changes. Trained weights are
rounded to the stored 16-bit precision before the "after" numbers are taken, so the report
describes the model that is saved. Deterministic for a given seed and torch thread count (the
caller sets the threads).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.adapters import Adapter, FFNHandle, get_adapter
from ffsplit.config import HealConfig
from ffsplit.errors import FFSplitError
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import DenseLinear, LowRankLinear, QuantizedLinear, to_storage

Progress = Callable[[int, int], None]
# Rows of FFN inputs pushed through an FFN at once when measuring (bounds temporary memory).
_EVAL_ROWS = 4096
# Points of the loss curve kept in the report (evenly spaced over the steps).
_CURVE_POINTS = 20


@dataclass
class HealReport:
    """What healing did, in numbers (goes into the variant manifest under 'heal')."""

    config: dict[str, Any]
    loss: str
    steps: int
    parameters: int  # trained parameters (float elements)
    tokens: int  # calibration tokens available (one epoch)
    before: float  # distillation loss before healing ('local': mean over layers)
    after: float  # ... and after, with the weights rounded to their stored precision
    seconds: float  # wall time
    cpu_seconds: float  # this process's CPU time (all threads): the cost on a shared machine
    threads: int
    device: str
    layers: list[dict[str, float]] = field(default_factory=list)  # 'local': per layer
    curve: list[list[float]] = field(default_factory=list)  # [step, loss] pairs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------- parameters


def _split_projections(
    model: nn.Module, handle: FFNHandle
) -> list[SplitOutProjection | SplitInProjection]:
    modules = [model.get_submodule(p) for p in handle.projection_paths]
    if not all(isinstance(m, SplitOutProjection | SplitInProjection) for m in modules):
        raise FFSplitError(
            f"layer {handle.layer}: the FFN is not split (plain projections); heal a compressed "
            "variant, not a base model"
        )
    return modules  # type: ignore[return-value]


def trainable_parameters(
    model: nn.Module, adapter: Adapter, train_dense: bool
) -> dict[int, list[nn.Parameter]]:
    """Per FFN layer, the parameters healing trains: low-rank factors (and their biases), and with
    train_dense the dense blocks (heavy, or the kept neurons of pruning) and the output bias."""
    out: dict[int, list[nn.Parameter]] = {}
    for handle in adapter.ffns(model):
        params: list[nn.Parameter] = []
        for projection in _split_projections(model, handle):
            for part in projection.parts:
                if isinstance(part, LowRankLinear):
                    params += [part.a, part.b]
                    if part.bias is not None:
                        params.append(part.bias)
                elif isinstance(part, DenseLinear) and train_dense:
                    params.append(part.weight)
                    if part.bias is not None:
                        params.append(part.bias)
                elif isinstance(part, QuantizedLinear) and train_dense and part.bias is not None:
                    params.append(part.bias)  # a float bias beside codes; the codes stay
            if isinstance(projection, SplitInProjection) and train_dense:
                if projection.bias is not None:
                    params.append(projection.bias)
        out[handle.layer] = params
    return out


# ------------------------------------------------------------------------------------- FFN math


def ffn_output(model: nn.Module, handle: FFNHandle, x: Tensor) -> Tensor:
    """One FFN's output from its (original or split) projection modules: the canonical form of
    adapters/base.py, so every architecture is covered without its own forward."""
    h = model.get_submodule(handle.up_path)(x)
    if handle.gate_path is not None:
        h = handle.activation(model.get_submodule(handle.gate_path)(x)) * h
    else:
        h = handle.activation(h)
    return model.get_submodule(handle.down_path)(h)


@torch.no_grad()
def ffn_inputs(
    model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int
) -> dict[int, Tensor]:
    """Every FFN's input rows [tokens, d] (float32) when `model` reads the windows."""
    device = _device(model)
    handles = adapter.ffns(model)
    chunks: dict[int, list[Tensor]] = {h.layer: [] for h in handles}

    def hook(layer: int) -> Callable[..., None]:
        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            chunks[layer].append(x.detach().reshape(-1, x.shape[-1]).float())

        return capture

    hooks = [
        model.get_submodule(h.up_path).register_forward_pre_hook(hook(h.layer)) for h in handles
    ]
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {layer: torch.cat(parts) for layer, parts in chunks.items()}


@torch.no_grad()
def _apply_rows(model: nn.Module, handle: FFNHandle, x: Tensor) -> Tensor:
    return torch.cat(
        [ffn_output(model, handle, x[i : i + _EVAL_ROWS]) for i in range(0, len(x), _EVAL_ROWS)]
    )


@torch.no_grad()
def relative_error(model: nn.Module, handle: FFNHandle, x: Tensor, target: Tensor) -> float:
    """||FFN(x) - target||^2 / ||target||^2 over all rows (float64 sums)."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(x), _EVAL_ROWS):
        out = ffn_output(model, handle, x[i : i + _EVAL_ROWS])
        ref = target[i : i + _EVAL_ROWS]
        num += (out - ref).double().pow(2).sum().cpu()
        den += ref.double().pow(2).sum().cpu()
    return float(num / den) if den > 0 else float(num)


def _relative_loss(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


# ------------------------------------------------------------------------------------ utilities


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batches(count: int, size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """`steps` index batches: a seeded permutation per epoch, cut into batches of `size`."""
    size = min(size, count)
    order = torch.randperm(count, generator=generator)
    position = 0
    for _ in range(steps):
        if position + size > count:
            order = torch.randperm(count, generator=generator)
            position = 0
        yield order[position : position + size]
        position += size


def _cosine(optimizer: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    """Cosine decay from lr to 0 over the steps (no warmup: Adam's bias correction suffices)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def _curve_steps(steps: int) -> set[int]:
    return {round(i * (steps - 1) / (_CURVE_POINTS - 1)) for i in range(_CURVE_POINTS)}


@torch.no_grad()
def _round_to_storage(params: list[nn.Parameter]) -> None:
    for p in params:
        p.copy_(to_storage(p))


def _check_models(dense: nn.Module, student: nn.Module, adapter: Adapter) -> None:
    dense_adapter = get_adapter(dense)
    if dense_adapter.name != adapter.name:
        raise FFSplitError(
            f"heal: the dense model (adapter {dense_adapter.name}) is not the compressed model's "
            f"architecture ({adapter.name})"
        )
    a, b = adapter.ffns(dense), adapter.ffns(student)
    if len(a) != len(b):
        raise FFSplitError(
            f"heal: the dense model has {len(a)} FFN layers, the compressed one {len(b)}; pass "
            "the base model the variant was made from"
        )
    for t, s in zip(a, b, strict=True):
        dense_in = dense.get_submodule(t.up_path)
        split = student.get_submodule(s.up_path)
        dense_d = getattr(dense_in, "in_features", None) or dense_in.weight.shape[0]
        if getattr(split, "in_features", dense_d) != dense_d:
            raise FFSplitError(
                f"heal: layer {t.layer} has hidden size {dense_d} in the dense model and "
                f"{split.in_features} in the compressed one; pass the matching base model"
            )


def _check_windows(windows: Tensor) -> None:
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise FFSplitError("heal: windows must be a 2-D LongTensor [n, T] of token ids")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise FFSplitError(
            f"heal: need at least one window of 2+ tokens, got {tuple(windows.shape)}"
        )


# ----------------------------------------------------------------------------------------- heal


def heal(
    dense: nn.Module,
    student: nn.Module,
    windows: Tensor,
    config: HealConfig,
    *,
    adapter: Adapter | None = None,
    progress: Progress | None = None,
) -> HealReport:
    """Train the compressed FFNs of `student` in place to match `dense` on calibration windows.

    dense: the base model the student was compressed from (read only). windows: calibration token
    windows [n, T] (ffsplit.data.windows.calibration_windows: disjoint from evaluation text).
    progress(done, total) after every optimizer step.
    """
    if not config.enabled:
        raise FFSplitError("heal: heal.steps is 0 (healing is off); nothing to do")
    _check_windows(windows)
    adapter = adapter or get_adapter(student)
    _check_models(dense, student, adapter)
    per_layer = trainable_parameters(student, adapter, config.train_dense)
    params = [p for ps in per_layer.values() for p in ps]
    if not params:
        raise FFSplitError(
            "heal: the compressed model has no float FFN parts to train (quantized codes are not "
            "trained); set heal.train_dense true or heal.steps 0"
        )
    started, cpu_started = time.perf_counter(), time.process_time()
    flags = {id(p): p.requires_grad for p in student.parameters()}
    was_training = (dense.training, student.training)
    dense.eval()
    student.eval()  # no dropout: the distillation target and the student are deterministic
    for p in student.parameters():
        p.requires_grad_(False)
    try:
        if config.loss == "local":
            report = _heal_local(dense, student, adapter, windows, config, per_layer, progress)
        else:
            report = _heal_kl(dense, student, windows, config, params, progress)
    finally:
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), False))
        dense.train(was_training[0])
        student.train(was_training[1])
    report.parameters = sum(p.numel() for p in params)
    report.seconds = time.perf_counter() - started
    report.cpu_seconds = time.process_time() - cpu_started
    return report


def _new_report(config: HealConfig, windows: Tensor, device: torch.device) -> HealReport:
    return HealReport(
        config=config.to_dict(),
        loss=config.loss,
        steps=config.steps,
        parameters=0,
        tokens=int(windows.numel()),
        before=math.nan,
        after=math.nan,
        seconds=0.0,
        cpu_seconds=0.0,
        threads=torch.get_num_threads(),
        device=str(device),
    )


def _heal_local(
    dense: nn.Module,
    student: nn.Module,
    adapter: Adapter,
    windows: Tensor,
    config: HealConfig,
    per_layer: dict[int, list[nn.Parameter]],
    progress: Progress | None,
) -> HealReport:
    """Each FFN on its own: relative squared error to the dense FFN on the dense FFN inputs."""
    device = _device(student)
    report = _new_report(config, windows, device)
    inputs = ffn_inputs(dense, adapter, windows, config.batch_size)
    teacher = {h.layer: h for h in adapter.ffns(dense)}
    layers = [h for h in adapter.ffns(student) if per_layer.get(h.layer)]
    rows = config.batch_size * windows.shape[1]
    marks = _curve_steps(config.steps)
    curves: list[list[float]] = []
    total = config.steps * len(layers)
    for index, handle in enumerate(layers):
        x = inputs.pop(handle.layer).to(device)
        target = _apply_rows(dense, teacher[handle.layer], x.to(_device(dense))).to(device)
        before = relative_error(student, handle, x, target)
        params = per_layer[handle.layer]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=config.lr)
        # one generator per layer: a layer's batches do not depend on the other layers
        generator = torch.Generator().manual_seed(config.seed * 100_003 + handle.layer)
        curve: list[float] = []
        for step, idx in enumerate(_batches(len(x), rows, config.steps, generator)):
            _cosine(optimizer, config.lr, step, config.steps)
            idx = idx.to(device)
            loss = _relative_loss(ffn_output(student, handle, x[idx]), target[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step in marks:
                curve.append(float(loss.detach()))
            if progress is not None:
                progress(index * config.steps + step + 1, total)
        for p in params:
            p.requires_grad_(False)
        _round_to_storage(params)
        after = relative_error(student, handle, x, target)
        report.layers.append({"layer": handle.layer, "before": before, "after": after})
        curves.append(curve)
        del x, target, optimizer
    steps = sorted(marks)
    report.curve = [
        [float(s), sum(c[i] for c in curves) / len(curves)] for i, s in enumerate(steps)
    ]
    report.before = sum(r["before"] for r in report.layers) / len(report.layers)
    report.after = sum(r["after"] for r in report.layers) / len(report.layers)
    return report


def _logits(model: nn.Module, batch: Tensor) -> Tensor:
    output = model(input_ids=batch, use_cache=False)
    logits = getattr(output, "logits", None)
    if logits is None:
        raise FFSplitError(
            "heal: loss 'kl' needs a causal LM with logits; use heal.loss 'local' for encoders"
        )
    return logits


def _kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    positions = t.shape[0] * t.shape[1]
    return nn.functional.kl_div(s, t, log_target=True, reduction="sum") / positions


class _TeacherLogits:
    """The dense model's logits on calibration windows, by window index.

    A window's final hidden state (the LM head's input: d floats per token, not a vocabulary's
    worth) is kept after its first teacher forward, so later epochs pay the head's matmul instead
    of a whole forward: about a third of a KL step's cost. Used only where head(hidden) gives the
    model's logits exactly (checked on the first forward; logit soft-capping, say, turns it off).
    """

    def __init__(self, dense: nn.Module, windows: Tensor) -> None:
        self.dense = dense
        self.windows = windows
        get_head = getattr(dense, "get_output_embeddings", None)
        self.head: nn.Module | None = get_head() if callable(get_head) else None
        self.hidden: dict[int, Tensor] = {}

    @torch.no_grad()
    def __call__(self, idx: Tensor) -> Tensor:
        indices = [int(i) for i in idx]
        if self.head is None:
            return _logits(self.dense, self.windows[idx])
        missing = [i for i in dict.fromkeys(indices) if i not in self.hidden]
        if missing:
            captured: list[Tensor] = []
            hook = self.head.register_forward_pre_hook(
                lambda module, args: captured.append(args[0].detach())
            )
            try:
                logits = _logits(self.dense, self.windows[missing])
            finally:
                hook.remove()
            if len(captured) != 1 or not torch.equal(self.head(captured[0]), logits):
                self.head = None  # the logits are not the head's output alone: no shortcut
                self.hidden.clear()
                return _logits(self.dense, self.windows[idx])
            for position, index in enumerate(missing):
                self.hidden[index] = captured[0][position]
        return self.head(torch.stack([self.hidden[i] for i in indices]))


@torch.no_grad()
def _probe_kl(dense: nn.Module, student: nn.Module, probe: Tensor, batch_size: int) -> float:
    total = 0.0
    for start in range(0, probe.shape[0], batch_size):
        batch = probe[start : start + batch_size]
        total += float(_kl(_logits(dense, batch), _logits(student, batch))) * batch.shape[0]
    return total / probe.shape[0]


def _heal_kl(
    dense: nn.Module,
    student: nn.Module,
    windows: Tensor,
    config: HealConfig,
    params: list[nn.Parameter],
    progress: Progress | None,
) -> HealReport:
    """All FFNs at once: KL of the whole model's next-token distribution to the dense one."""
    device = _device(student)
    report = _new_report(config, windows, device)
    windows = windows.to(device)
    # before/after on a fixed probe: the first batch of windows (training text: a distillation
    # loss, not a held-out score)
    probe = windows[: config.batch_size]
    report.before = _probe_kl(dense, student, probe, config.batch_size)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    marks = _curve_steps(config.steps)
    teacher_logits = _TeacherLogits(dense, windows.to(_device(dense)))
    for step, idx in enumerate(
        _batches(windows.shape[0], config.batch_size, config.steps, generator)
    ):
        _cosine(optimizer, config.lr, step, config.steps)
        teacher = teacher_logits(idx).to(device)
        loss = _kl(teacher, _logits(student, windows[idx.to(device)]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in marks:
            report.curve.append([float(step), float(loss.detach())])
        del teacher, loss
        if progress is not None:
            progress(step + 1, config.steps)
    for p in params:
        p.requires_grad_(False)
    _round_to_storage(params)
    report.after = _probe_kl(dense, student, probe, config.batch_size)
    return report
