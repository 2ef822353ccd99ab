"""Load a model by packaged name or local folder: safetensors only, local files only, no remote
code, and never a silently wrong model (issue 16).

Every weight the architecture expects must come from the file, and every tensor in the file must
go somewhere (tied weights excepted): transformers' own loading report is checked, so a folder
with one FFN matrix removed is refused instead of loading with random values. config.json's sizes
are checked, and the model is first built on the meta device and counted against the weights
read, before any real memory is allocated. The sha256 reported is of the bytes actually read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.errors import FFSplitError
from ffsplit.files import shown
from ffsplit.models.folder import (
    CONFIG_FILES,
    TOKENIZER_FILES,
    check_dtypes,
    check_model_folder,
    private_folder,
    read_weights,
    stage_files,
    weight_files,
)
from ffsplit.models.registry import ModelRef, known_names, resolve_model

# Encoders load with AutoModel (no LM head); everything else with AutoModelForCausalLM.
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2"}
)
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# A model may hold at most this many more elements than its weights file (tied or generated
# buffers); more means the config describes another, larger model.
SLACK_ELEMENTS = 1 << 20


def is_causal_lm(config: Any) -> bool:
    """Whether a HF config describes a causal LM (decided by its architectures, else model_type)."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(name.endswith(CAUSAL_SUFFIXES) for name in architectures)
    return getattr(config, "model_type", None) not in ENCODER_MODEL_TYPES


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in tensor. Its sum first (one pass, no temporary; 15x faster than an
    element-wise isfinite on a 1-thread worker, where every model load pays this check): NaN or
    inf make the sum non-finite. Only then the exact check, since a sum can also overflow."""
    with torch.no_grad():
        return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (text[:300] or type(error).__name__).strip()


def read_config(private: Path, where: str) -> Any:
    """The transformers config of a staged folder (its config.json already checked)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            str(private), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers raises ValueError, KeyError, TypeError... on bad values
        raise FFSplitError(
            f"{where}: config.json is not a usable model config ({_first_line(exc)})"
        ) from None


def model_class_of(config: Any, where: str = "model") -> Any:
    """The concrete transformers class for a config: a causal LM head, else the bare model."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise FFSplitError(
            f"{where}: transformers has no {auto.__name__} for model type {config.model_type!r}"
        ) from None


def empty_model(config: Any, where: str) -> nn.Module:
    """The architecture built on the meta device: shapes and names, no memory."""
    try:
        with torch.device("meta"):
            return model_class_of(config, where)._from_config(config)
    except Exception as exc:  # a config transformers cannot build (bad head count, ...)
        raise FFSplitError(
            f"{where}: config.json does not describe a model transformers can build "
            f"({_first_line(exc)})"
        ) from None


def check_fits(skeleton: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """The model config.json describes must not be larger than the weights read (else some of it
    would be random), and its float weights must be stored as floats."""
    params = {id(p): p.numel() for p in skeleton.parameters()}
    stored = sum(t.numel() for t in state.values())
    if sum(params.values()) > stored + SLACK_ELEMENTS:
        raise FFSplitError(
            f"{where}: config.json describes {sum(params.values()):,} parameters but the weights "
            f"hold {stored:,} values: config and weights are of different models"
        )
    floats = {name for name, p in skeleton.named_parameters() if p.is_floating_point()}
    check_dtypes(state, floats, where)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    for name, tensor in sorted(state.items()):
        want = shapes.get(name)
        if want is not None and want != tuple(tensor.shape):
            raise FFSplitError(
                f"{where}: weight {name} has shape {list(tensor.shape)}, config.json makes it "
                f"{list(want)}: config and weights are of different models"
            )


def check_loading_info(info: dict[str, Any], where: str) -> None:
    """transformers' report of a load: nothing missing (random), unexpected or of another shape."""
    problems = []
    for key, label in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "of another shape"),
    ):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if info.get("error_msgs"):
        problems.append(_first_line(Exception(info["error_msgs"][0])))
    if problems:
        raise FFSplitError(
            f"{where}: the weights do not match the architecture ({'; '.join(problems)}); "
            "a missing weight would load as random values"
        )


def build_loaded(private: Path, state: dict[str, Tensor], dtype: torch.dtype, where: str) -> Any:
    """The model of a staged folder with the weights read: counted on the meta device first,
    then loaded strictly (missing, unexpected or reshaped weights refused)."""
    config = read_config(private, where)
    check_fits(empty_model(config, where), state, where)
    try:
        model, info = model_class_of(config, where).from_pretrained(
            None,  # weights come only from state (transformers refuses a folder with it)
            config=config,
            state_dict=state,
            dtype=dtype,
            output_loading_info=True,
            local_files_only=True,
            trust_remote_code=False,
        )
    except Exception as exc:  # shape mismatches and conversion errors surface as several types
        raise FFSplitError(
            f"{where}: the weights do not fit config.json ({_first_line(exc)})"
        ) from None
    check_loading_info(info, where)
    if (private / "generation_config.json").is_file() and model.can_generate():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(private))
        except Exception as exc:  # bad values raise ValueError or TypeError
            raise FFSplitError(
                f"{where}: generation_config.json is not usable ({_first_line(exc)})"
            ) from None
    return model


def load_tokenizer(private: Path, where: str) -> Any:
    """The tokenizer of a staged folder, or None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    if not any((private / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(
            str(private), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # tokenizers raises plain Exception for a damaged file
        raise FFSplitError(
            f"{where}: tokenizer files are unreadable ({_first_line(exc)})"
        ) from None


# Special tokens a tokenizer may hold beyond the embedding rows (e.g. multimodal placeholders that
# text never produces); more than this and the tokenizer is another model's.
TOKENIZER_SLACK = 64


def check_tokenizer_fits(model: nn.Module, tokenizer: Any, where: str) -> None:
    """A tokenizer whose ids run past the embedding would index out of range at the first text
    (a traceback deep in the forward): refused at load, naming both sizes."""
    if tokenizer is None or not hasattr(model, "get_input_embeddings"):
        return
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows + TOKENIZER_SLACK:
        raise FFSplitError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{rows} rows: the tokenizer is another model's"
        )


def check_finite(model: nn.Module, where: str) -> None:
    for name, tensor in model.named_parameters():  # buffers may hold -inf masks on purpose
        if tensor.is_floating_point() and not all_finite(tensor):
            raise FFSplitError(f"{where}: weight {name} holds NaN or inf")


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> tuple[torch.nn.Module, Any, ModelRef]:
    """(model in eval mode, tokenizer, ModelRef) for a packaged name or a local HF folder.

    The tokenizer is None when the folder has no tokenizer files (e.g. a saved tiny test model).
    ref.weights_sha256 is the hash of the weight bytes this call read.
    """
    candidate = Path(str(name_or_path)).expanduser()
    if candidate.is_dir():
        _refuse_variant(candidate)
    ref = resolve_model(name_or_path, cache_dir, hash_weights=False)
    folder = ref.path
    where = f"model folder {shown(folder)}"
    check_model_folder(folder, known_names())
    files, weight_map = weight_files(folder)
    with private_folder() as private:
        stage_files(folder, (*CONFIG_FILES, *TOKENIZER_FILES), private)
        state, digest = read_weights(files, weight_map, where)
        if ref.weights_sha256 and digest != ref.weights_sha256:
            raise FFSplitError(
                f"cached model {shown(folder)}: weights sha256 {digest[:12]}... does not match the "
                f"record ({ref.weights_sha256[:12]}...): the cache changed; remove the folder to "
                "rebuild it"
            )
        if any(".parts." in name for name in state):
            raise FFSplitError(
                f"{where}: holds compressed (split) weights but no manifest.json; a variant "
                "loads only through its manifest: restore it"
            )
        model = build_loaded(private, state, dtype, where)
        del state
        tokenizer = load_tokenizer(private, where)
    check_finite(model, where)
    check_tokenizer_fits(model, tokenizer, where)
    _name_as(model, tokenizer, folder)
    model.to(device)
    model.eval()
    return model, tokenizer, dataclasses.replace(ref, weights_sha256=digest)


def _refuse_variant(folder: Path) -> None:
    """A variant folder is never loaded as a base model, whole or with its manifest damaged."""
    manifest = folder / "manifest.json"
    if manifest.is_symlink() or (manifest.exists() and not manifest.is_file()):
        raise FFSplitError(
            f"{shown(manifest)}: not a regular file; a variant loads only through its manifest"
        )
    if manifest.exists():
        raise FFSplitError(
            f"{shown(folder)} is an ffsplit variant folder (it has manifest.json): load it with "
            "ffsplit.variant.io.load_variant, not load_model"
        )
    if (folder / "neurons.safetensors").exists() or (folder / "neurons.safetensors").is_symlink():
        raise FFSplitError(
            f"{shown(folder)}: an ffsplit variant (neurons.safetensors) without its manifest.json; "
            "a variant loads only through its manifest: restore it"
        )


def _name_as(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Loaded from a private copy: name the folder it came from, as a direct load would."""
    config = getattr(model, "config", None)
    if config is not None:
        config._name_or_path = str(folder)
    if tokenizer is not None:
        tokenizer.name_or_path = str(folder)
