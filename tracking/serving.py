"""Serve an ffsplit variant as an MLflow pyfunc model: score texts or token ids, or generate.

The logged model holds the variant folder as an artifact (safetensors + JSON, sha256-checked at load)
and a two-line "models from code" script that instantiates FFSplitVariantModel, so nothing is pickled:
not the torch module, not even the Python model object. Loading needs this project installed
(`ffsplit` and `tracking` importable), like any code model; `mlflow models serve` therefore runs
with `--env-manager local`.

The contract (the logged signature says it too; README "Serve the champion" shows requests):
- Input: a table, one row per sequence, with a ``text`` column (string) or an ``input_ids`` column
  (list of int); a row holds one of the two. Texts are tokenized by the variant's tokenizer
  (without one, only ``input_ids`` work). Over HTTP: ``{"dataframe_records": [{"text": "..."}]}``
  or ``{"dataframe_split": {"columns": ["input_ids"], "data": [[[1, 2, 3]]]}}``. MLflow drops
  unnamed columns, so a bare list of texts arrives empty: name the column.
- params: ``task`` "score" (default) or "generate"; ``max_new_tokens`` (1..4096, default 32).
- Output, one row per input. score, causal LMs: ``tokens`` (int), ``nll`` (mean negative
  log-likelihood in nats of tokens 2..n given their prefix; NaN for one-token inputs),
  ``perplexity`` (exp(nll)), ``last_logits`` (list of float: the next-token logits after the
  input, vocabulary-sized, the float32 values of ffsplit.load_variant's model exactly). score,
  encoders: ``tokens`` and ``embedding`` (mean-pooled last hidden state). generate, causal LMs:
  greedy decoding, ``generated_ids`` (list of int) and ``generated_text`` (None without a
  tokenizer).
- Bad input (no column, both or neither in a row, ids outside the vocabulary, too long, unknown
  params) raises MlflowException INVALID_PARAMETER_VALUE with one line saying what: HTTP 400.

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
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from ffsplit.variant import load_variant

VARIANT_ARTIFACT = "variant"
TASKS = ("score", "generate")
DEFAULT_PARAMS: dict[str, Any] = {"task": "score", "max_new_tokens": 32}
MAX_NEW_TOKENS = 4096
TEXT, INPUT_IDS = "text", "input_ids"

# Inputs: one row per sequence, a text or its token ids (each column optional, one per row).
INPUT_SCHEMA = Schema(
    [
        ColSpec(DataType.string, TEXT, required=False),
        ColSpec(Array(DataType.long), INPUT_IDS, required=False),
    ]
)
# The params schema is also what makes MLflow pass `params` through at all.
PARAMS_SCHEMA = ParamSchema(
    [
        ParamSpec("task", DataType.string, DEFAULT_PARAMS["task"]),
        ParamSpec("max_new_tokens", DataType.long, DEFAULT_PARAMS["max_new_tokens"]),
    ]
)
# Outputs by task; columns are optional because each task fills its own.
CAUSAL_OUTPUTS = Schema(
    [
        ColSpec(DataType.long, "tokens", required=False),
        ColSpec(DataType.double, "nll", required=False),
        ColSpec(DataType.double, "perplexity", required=False),
        ColSpec(Array(DataType.double), "last_logits", required=False),
        ColSpec(Array(DataType.long), "generated_ids", required=False),
        ColSpec(DataType.string, "generated_text", required=False),
    ]
)
ENCODER_OUTPUTS = Schema(
    [
        ColSpec(DataType.long, "tokens"),
        ColSpec(Array(DataType.double), "embedding"),
    ]
)
EXAMPLE_TEXT = "The heavy hitters hold most of the output norm."

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
    """pyfunc wrapper around ffsplit.load_variant (see the module docstring for the contract)."""

    # The signature is declared explicitly (signature_for); predict's pd.DataFrame hint is one MLflow
    # infers nothing from, so it neither warns nor wraps predict in its own validation.
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

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Score (default) or generate; one output row per input sequence."""
        task, max_new_tokens = _check_params(params)
        sequences = self.token_ids(model_input)
        if task == "generate":
            return pd.DataFrame(self._generate(sequences, max_new_tokens))
        return pd.DataFrame(self._score(sequences))

    def token_ids(self, model_input: Any) -> list[list[int]]:
        """Token id lists of the inputs: texts are tokenized with the variant's tokenizer."""
        ids = []
        for row, item in enumerate(_rows(model_input)):
            if isinstance(item, str):
                if self.tokenizer is None:
                    raise _bad_input(
                        f"input row {row}: this variant has no tokenizer; pass token ids (an "
                        "'input_ids' column) instead of text"
                    )
                item = list(self.tokenizer(item)["input_ids"])
            ids.append(item)
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
    if hasattr(count, "item") and not isinstance(count, str):
        count = count.item()  # numpy scalars from MLflow's params schema
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_NEW_TOKENS:
        raise _bad_input(
            f"params.max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {count!r}"
        )
    return task, count


def _missing(value: Any) -> bool:
    """An empty cell of an optional column (None, NaN, pandas NA)."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and arrays are values
        return False


def _id_list(value: Any) -> list[int] | None:
    """value as a list of int token ids, or None if it is not one (numpy arrays included)."""
    if isinstance(value, str | bytes | dict) or not hasattr(value, "__iter__"):
        return None
    items = [v.item() if hasattr(v, "item") else v for v in value]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return items
    return None


def _rows(model_input: Any) -> list[str | list[int]]:
    """One text or one token id list per input row.

    The logged signature makes MLflow hand over a DataFrame with 'text' and/or 'input_ids'
    columns. Direct calls (FFSplitVariantModel.predict, models logged before the signature) may
    also pass a text, a list of texts or a list of token id lists."""
    data = model_input
    if isinstance(data, dict):
        data = pd.DataFrame(data)
    if isinstance(data, pd.Series):
        data = data.tolist()
    if isinstance(data, pd.DataFrame):
        return _frame_rows(data)
    if hasattr(data, "tolist") and not isinstance(data, str):
        data = data.tolist()
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list | tuple) or not data:
        raise _bad_input(
            "expected rows with a 'text' or an 'input_ids' column, got "
            f"{'no rows' if isinstance(data, list | tuple) else type(model_input).__name__}"
        )
    rows: list[str | list[int]] = []
    for row, item in enumerate(data):
        ids = None if isinstance(item, str) else _id_list(item)
        if not isinstance(item, str) and ids is None:
            raise _bad_input(f"input row {row}: expected a text or a list of integer token ids")
        rows.append(item if isinstance(item, str) else ids)  # type: ignore[arg-type]
    return rows


def _frame_rows(frame: pd.DataFrame) -> list[str | list[int]]:
    columns = [c for c in (TEXT, INPUT_IDS) if c in frame.columns]
    if not columns:
        if len(frame.columns) == 1:  # a model logged without the signature, one unnamed column
            return _rows(frame.iloc[:, 0].tolist())
        raise _bad_input(
            f"expected a 'text' or an 'input_ids' column, got columns {list(frame.columns)} (MLflow "
            "drops unnamed columns: send records like {'text': ...} or {'input_ids': [...]})"
        )
    if frame.empty:
        raise _bad_input("expected rows with a 'text' or an 'input_ids' column, got no rows")
    rows: list[str | list[int]] = []
    for row, record in enumerate(frame[columns].to_dict("records")):
        given = {c: v for c, v in record.items() if not _missing(v)}
        if len(given) != 1:
            raise _bad_input(
                f"input row {row}: give exactly one of 'text' and 'input_ids', got "
                f"{sorted(given) or 'neither'}"
            )
        [(column, value)] = given.items()
        if column == TEXT:
            if not isinstance(value, str):
                raise _bad_input(f"input row {row}: 'text' must be a string")
            rows.append(value)
            continue
        ids = _id_list(value)
        if ids is None:
            raise _bad_input(f"input row {row}: 'input_ids' must be a list of integers")
        rows.append(ids)
    return rows


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


def _variant_is_causal(variant_dir: Path) -> bool:
    """Causal LM or encoder, from the variant's config.json (without loading weights)."""
    from transformers import AutoConfig

    from ffsplit.models.loading import is_causal_lm

    try:
        config = AutoConfig.from_pretrained(str(variant_dir))
    except (OSError, ValueError) as exc:
        raise MlflowException(f"{variant_dir}: unreadable config.json ({exc})") from None
    return is_causal_lm(config)


def signature_for(variant_dir: str | Path) -> ModelSignature:
    """The logged signature: the input table and params of every variant, the outputs of its kind."""
    causal = _variant_is_causal(Path(variant_dir))
    return ModelSignature(
        inputs=INPUT_SCHEMA,
        outputs=CAUSAL_OUTPUTS if causal else ENCODER_OUTPUTS,
        params=PARAMS_SCHEMA,
    )


def input_example_for(variant_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A request that works on this variant: a text when it has a tokenizer, else token ids."""
    folder = Path(variant_dir)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        frame = pd.DataFrame({TEXT: [EXAMPLE_TEXT]})
    else:
        frame = pd.DataFrame({INPUT_IDS: [[1, 2, 3, 4]]})
    return frame, {"task": "score"}


def save_pyfunc(
    variant_dir: str | Path,
    out: str | Path,
    *,
    run_id: str | None = None,
    artifact_path: str | None = None,
) -> Path:
    """Write an MLflow pyfunc model folder for a variant (out must not exist or be empty).

    The variant folder is copied in as the 'variant' artifact; the model code is a generated
    script importing FFSplitVariantModel (MLflow 'models from code'), so no object is pickled.
    run_id and artifact_path (where the folder is logged in that run) are recorded in MLmodel, as
    log_model would: a loaded model's metadata.run_id names its run.
    Saving runs no prediction: the input example is only checked against the signature.
    """
    out = Path(out)
    variant_dir = Path(variant_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="ffsplit-pyfunc-") as tmp:
        code = Path(tmp) / CODE_FILE
        code.write_text(_CODE)
        with warnings.catch_warnings():
            # MLflow 3.17 compares an example's columns with range() when writing it, which
            # pandas 3 deprecates (mlflow/models/utils.py _convert_dataframe_to_split_dict).
            warnings.filterwarnings(
                "ignore", message=r"Operation with range is deprecated", module=r"mlflow\."
            )
            mlflow.pyfunc.save_model(
                path=str(out),
                python_model=str(code),
                artifacts={VARIANT_ARTIFACT: str(variant_dir)},
                signature=signature_for(variant_dir),
                input_example=input_example_for(variant_dir),
                pip_requirements=pip_requirements(),
                mlflow_model=Model(run_id=run_id, artifact_path=artifact_path),
            )
    return out


def variant_path_in_model(model_dir: str | Path) -> str:
    """Where save_pyfunc put the variant inside a model folder (relative, e.g. 'artifacts/v1')."""
    flavor = Model.load(str(model_dir)).flavors["python_function"]
    return str(flavor["artifacts"][VARIANT_ARTIFACT]["path"])
