"""Serve an ffsplit variant as an MLflow pyfunc model: score texts or generate from them.

The logged model holds the variant folder as an artifact (safetensors + JSON, sha256-checked at load)
and a two-line "models from code" script that instantiates FFSplitVariantModel, so nothing is pickled:
not the torch module, not even the Python model object. Loading needs this project installed
(`ffsplit` and `tasks` importable), like any code model; `mlflow models serve` therefore runs with
`--env-manager local`.

predict(model_input, params) takes texts (a str, a list of str, or a DataFrame / dict with a "text"
column) or token ids (a list of int lists, or a DataFrame / dict with an "input_ids" column), one
row per sequence, and returns a pandas DataFrame with one row per input:

- params["task"] == "score" (default), causal LMs: ``tokens`` (int), ``nll`` (mean negative
  log-likelihood in nats of tokens 2..n given their prefix; NaN for one-token inputs),
  ``perplexity`` (exp(nll)), ``last_logits`` (list of float: next-token logits after the input,
  vocabulary-sized). Encoders: ``tokens`` and ``embedding`` (mean-pooled last hidden state).
- params["task"] == "generate", causal LMs: greedy decoding of params["max_new_tokens"] tokens:
  ``generated_ids`` (list of int) and ``generated_text`` (None without a tokenizer).

Each sequence runs alone (no padding), so its logits equal those of ffsplit.load_variant exactly.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec

from ffsplit.variant import load_variant

VARIANT_ARTIFACT = "variant"
TASKS = ("score", "generate")
DEFAULT_PARAMS: dict[str, Any] = {"task": "score", "max_new_tokens": 32}
MAX_NEW_TOKENS = 4096

# No input schema: inputs are texts or token ids, checked by predict itself. The params schema is
# what makes MLflow pass `params` through at all (undeclared params are dropped with a warning).
SIGNATURE = ModelSignature(
    inputs=None,
    params=ParamSchema(
        [
            ParamSpec("task", "string", DEFAULT_PARAMS["task"]),
            ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
        ]
    ),
)

CODE_FILE = "ffsplit_variant_model.py"
_CODE = (
    "# MLflow 'models from code' entry: no pickle; the weights are the variant artifact.\n"
    "from mlflow.models import set_model\n\n"
    "from tracking.serving import FFSplitVariantModel\n\n"
    "set_model(FFSplitVariantModel())\n"
)


def _bad_input(message: str) -> MlflowException:
    """An input error (HTTP 400 when served), never a stack trace from deep inside torch."""
    return MlflowException.invalid_parameter_value(message)


class FFSplitVariantModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around ffsplit.load_variant (see the module docstring for the I/O schema)."""

    # MLflow 3 turns predict's type hints into input validation (and warns when there are none);
    # this model takes several input shapes and checks them itself (token_ids).
    _skip_type_hint_validation = True

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.manifest: dict[str, Any] = {}

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts[VARIANT_ARTIFACT])

    def load(self, variant_dir: str | Path) -> FFSplitVariantModel:
        """Load a variant folder directly (what load_context does with the logged artifact)."""
        self.model, self.tokenizer, self.manifest = load_variant(variant_dir)
        return self

    @property
    def causal(self) -> bool:
        """Causal LM (logits, generation) or encoder (hidden states), as load_variant decided."""
        from ffsplit.models.loading import is_causal_lm

        return is_causal_lm(self._model().config)

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise MlflowException("FFSplitVariantModel used before load_context/load")
        return self.model

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Score (default) or generate; one output row per input sequence."""
        import pandas as pd

        task, max_new_tokens = _check_params(params)
        sequences = self.token_ids(model_input)
        if task == "generate":
            return pd.DataFrame(self._generate(sequences, max_new_tokens))
        return pd.DataFrame(self._score(sequences))

    def token_ids(self, model_input: Any) -> list[list[int]]:
        """Token id lists of the inputs: texts are tokenized with the variant's tokenizer."""
        texts, ids = _split_input(model_input)
        if texts is not None:
            if self.tokenizer is None:
                raise _bad_input(
                    "this variant has no tokenizer: pass token ids (an 'input_ids' column) instead "
                    "of text"
                )
            ids = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        assert ids is not None
        limit = getattr(self._model().config, "max_position_embeddings", None)
        vocab = self._model().config.vocab_size
        for row, seq in enumerate(ids):
            if not seq:
                raise _bad_input(f"input row {row} has no tokens")
            if limit is not None and len(seq) > limit:
                raise _bad_input(f"input row {row} has {len(seq)} tokens; this model takes {limit}")
            if min(seq) < 0 or max(seq) >= vocab:
                raise _bad_input(f"input row {row} holds token ids outside 0..{vocab - 1}")
        return ids

    def logits(self, model_input: Any) -> list[torch.Tensor]:
        """Per input, the model's output tensor [tokens, vocab] (causal LMs: logits; encoders: last
        hidden state), each sequence run alone: equal to ffsplit.load_variant's model output."""
        return [self._forward(seq) for seq in self.token_ids(model_input)]

    def _forward(self, seq: Sequence[int]) -> torch.Tensor:
        model = self._model()
        ids = torch.tensor([list(seq)], dtype=torch.long, device=_device(model))
        with torch.inference_mode():
            out = model(input_ids=ids)
        tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return tensor[0].float().cpu()

    def _score(self, sequences: list[list[int]]) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {"tokens": []}
        causal = self.causal
        for seq in sequences:
            out = self._forward(seq)
            rows["tokens"].append(len(seq))
            if not causal:
                rows.setdefault("embedding", []).append(out.mean(0).tolist())
                continue
            if len(seq) > 1:
                targets = torch.tensor(seq[1:], dtype=torch.long)
                nll = float(torch.nn.functional.cross_entropy(out[:-1], targets))
            else:
                nll = math.nan
            rows.setdefault("nll", []).append(nll)
            rows.setdefault("perplexity", []).append(math.exp(nll) if math.isfinite(nll) else nll)
            rows.setdefault("last_logits", []).append(out[-1].tolist())
        return rows

    def _generate(self, sequences: list[list[int]], max_new_tokens: int) -> dict[str, list[Any]]:
        if not self.causal:
            raise _bad_input("task 'generate' needs a causal language model; this is an encoder")
        model = self._model()
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        rows: dict[str, list[Any]] = {"generated_ids": [], "generated_text": []}
        for seq in sequences:
            ids = torch.tensor([seq], dtype=torch.long, device=_device(model))
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=eos if eos is not None else 0,
                )
            new = out[0, ids.shape[1] :].tolist()
            rows["generated_ids"].append(new)
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(new, skip_special_tokens=True)
            rows["generated_text"].append(text)
        return rows


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_params(params: dict[str, Any] | None) -> tuple[str, int]:
    merged = {**DEFAULT_PARAMS, **(params or {})}
    unknown = sorted(set(merged) - set(DEFAULT_PARAMS))
    if unknown:
        raise _bad_input(f"unknown params {unknown}; this model takes {sorted(DEFAULT_PARAMS)}")
    task = merged["task"]
    if task not in TASKS:
        raise _bad_input(f"params.task must be one of {', '.join(TASKS)}, got {task!r}")
    count = merged["max_new_tokens"]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_NEW_TOKENS:
        raise _bad_input(
            f"params.max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {count!r}"
        )
    return task, count


def _is_id_list(value: Any) -> bool:
    try:
        items = list(value)
    except TypeError:
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) for v in _plain(items))


def _plain(items: list[Any]) -> list[Any]:
    """numpy scalars to Python numbers (DataFrame cells arrive as numpy arrays of int64)."""
    return [v.item() if hasattr(v, "item") and not isinstance(v, str) else v for v in items]


def _split_input(model_input: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists) from the accepted input shapes."""
    import numpy as np
    import pandas as pd

    data = model_input
    if isinstance(data, dict):
        data = pd.DataFrame(data)
    if isinstance(data, pd.Series):
        data = data.tolist()
    if isinstance(data, pd.DataFrame):
        if "input_ids" in data.columns:
            data = data["input_ids"].tolist()
        elif "text" in data.columns:
            data = data["text"].tolist()
        elif len(data.columns) == 1:
            data = data.iloc[:, 0].tolist()
        else:
            raise _bad_input(
                f"expected a 'text' or an 'input_ids' column, got columns {list(data.columns)}"
            )
    if isinstance(data, np.ndarray):
        data = data.tolist()
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list | tuple) or not data:
        raise _bad_input(
            f"expected texts or token id lists, got {type(model_input).__name__} "
            f"{'(empty)' if isinstance(data, list | tuple) else ''}".strip()
        )
    if all(isinstance(t, str) for t in data):
        return list(data), None
    if all(_is_id_list(seq) for seq in data):
        return None, [[int(v) for v in _plain(list(seq))] for seq in data]
    raise _bad_input("expected every input row to be a text or a list of integer token ids")


def pip_requirements() -> list[str]:
    """What a loading environment needs (this project itself included: the model is code)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", "torch", "transformers", "safetensors", "pandas", "ffsplit"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def save_pyfunc(variant_dir: str | Path, out: str | Path) -> Path:
    """Write an MLflow pyfunc model folder for a variant (out must not exist or be empty).

    The variant folder is copied in as the 'variant' artifact; the model code is a generated
    script importing FFSplitVariantModel (MLflow 'models from code'), so no object is pickled.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="ffsplit-pyfunc-") as tmp:
        code = Path(tmp) / CODE_FILE
        code.write_text(_CODE)
        with warnings.catch_warnings():
            # No input example: deliberate (see SIGNATURE); MLflow would run predict to use one.
            warnings.filterwarnings("ignore", message=r".*input example", category=UserWarning)
            # predict's hints are deliberately not an MLflow schema (_skip_type_hint_validation).
            warnings.filterwarnings("ignore", message=r".*from type hint", category=UserWarning)
            mlflow.pyfunc.save_model(
                path=str(out),
                python_model=str(code),
                artifacts={VARIANT_ARTIFACT: str(Path(variant_dir).resolve())},
                signature=SIGNATURE,
                pip_requirements=pip_requirements(),
            )
    return out


def variant_path_in_model(model_dir: str | Path) -> str:
    """Where save_pyfunc put the variant inside a model folder (relative, e.g. 'artifacts/v1')."""
    from mlflow.models import Model

    flavor = Model.load(str(model_dir)).flavors["python_function"]
    return str(flavor["artifacts"][VARIANT_ARTIFACT]["path"])
