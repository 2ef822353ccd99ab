"""`ffsplit` command line: models, profile, compress, eval.

Every command takes a known model name or a local folder, prints a table (or `--json` on stdout),
shows progress on stderr, and on bad input exits 2 with one line that says what and where.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ffsplit.config import (
    DEFAULT_CALIB_TOKENS,
    DEFAULT_EVAL_TOKENS,
    DEFAULT_FFN_REDUCTION,
    DEFAULT_HEAVY_RATIO,
    DEFAULT_OUTLIER_RATIO,
    DEFAULT_WINDOW,
)
from ffsplit.errors import FFSplitError
from ffsplit.files import check_output_path, claim_output, shown


class _OneLineErrors(typer.Typer):
    """A typer app whose usage errors (a value that is not a number, an unknown option or command)
    print as one line and exit 2, like every other bad input, instead of a multi-line panel."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "standalone_mode" in kwargs:  # a caller that handles click's exceptions itself
            return super().__call__(*args, **kwargs)
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as exc:  # click's usage errors (typer vendors click)
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one printed the help already
                ctx = getattr(exc, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                message = escape(f"{exc.format_message()}{hint}")
                err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("[bold red]error:[/] aborted", highlight=False)
            sys.exit(1)
        except typer.Exit as exc:  # raised by _fail outside a command's own handling
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, Terminated):
            err.print("[bold red]error:[/] interrupted; nothing half-written was kept")
            sys.exit(2)
        except Exception as exc:  # a bug, not bad input: still one line (FFSPLIT_DEBUG=1: all)
            if os.environ.get("FFSPLIT_DEBUG"):
                raise
            reason = escape(_one_line(" ".join(str(exc).split())[:300]))
            err.print(
                f"[bold red]error:[/] internal error ({type(exc).__name__}: {reason}); please "
                "report it (FFSPLIT_DEBUG=1 shows the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = _OneLineErrors(
    add_completion=False,
    no_args_is_help=True,
    help="Split transformer FFNs into heavy hitters and a compressed light part (arXiv 2401.04044).",
)
err = Console(stderr=True)
out = Console()


class Method(StrEnum):
    lowrank = "lowrank"
    quant = "quant"
    prune = "prune"


class Baseline(StrEnum):
    uniform = "uniform"
    random = "random"
    outlier = "outlier"  # the column-outlier baseline (quant only)


class HealLoss(StrEnum):
    local = "local"
    kl = "kl"


def _one_line(message: str) -> str:
    """A message as one line: control characters (a newline in a file name) shown escaped."""
    return "".join(
        c if c.isprintable() or c == " " else repr(c)[1:-1] for c in " ".join(message.split(" "))
    )


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(_one_line(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so every atomic writer removes its temporaries."""


def _on_terminate(signum: int, frame: Any) -> None:
    # The first signal starts the clean exit; more signals must not interrupt the cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Terminated


def _os_error(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else "output"
    if exc.errno == errno.ENOSPC:  # nothing is half-written (atomic writes), but say so
        return f"disk full while writing {shown(where)}; nothing was kept"
    return f"{exc.strerror or type(exc).__name__}: {shown(where)}"


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """FFSplitError (and plain OS errors) become one line and exit code 2, no traceback."""
    previous = signal.signal(signal.SIGTERM, _on_terminate)
    try:
        yield
    except FFSplitError as exc:
        _fail(str(exc))
    except FileExistsError as exc:
        _fail(f"{shown(exc.filename or 'output')} already exists: another run wrote it first")
    except OSError as exc:
        _fail(_os_error(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing half-written was kept")
    except Terminated:
        _fail("terminated (SIGTERM); nothing half-written was kept")
    except MemoryError:
        _fail("out of memory; the input asks for more than this machine has")
    except Exception as exc:
        # safetensors reports a failed write (disk full, file-size limit) as SafetensorError, not
        # OSError; atomic writes kept nothing, so it is one line like the rest.
        if type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
            _fail(
                f"could not write the weights ({str(exc).splitlines()[0]}); disk full? nothing was kept"
            )
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _output(path: Path) -> Iterator[Path]:
    """An --out path checked before any work (writable, not there yet, a sane name; stale
    temporaries of dead runs beside it removed) and claimed for the whole run, so a second run
    writing the same path fails at once instead of racing this one."""
    target = check_output_path(path)
    with claim_output(target):
        if os.path.lexists(target):  # written by a run that finished while this one started
            raise FFSplitError(f"--out {shown(target)}: already exists; choose another --out")
        yield path


def _quiet_libraries() -> None:
    """stderr carries our progress bars and one-line errors only: no transformers bars or notes."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@contextlib.contextmanager
def _progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback (stage, done, total) drawing one bar per stage on stderr."""
    _quiet_libraries()
    if not enabled or not err.is_terminal and os.environ.get("FFSPLIT_PROGRESS") != "1":
        yield lambda stage, done, total: None
        return
    bars = Progress(
        TextColumn("{task.description:>11}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, Any] = {}
    with bars:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def _emit(data: dict[str, Any], as_json: bool, table: Callable[[dict[str, Any]], Table]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
    else:
        out.print(table(data))


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(
            key,
            value
            if isinstance(value, str)
            else f"{value:,}"
            if isinstance(value, int)
            else f"{value:.4g}"
            if isinstance(value, float)
            else str(value),
        )
    return table


def _check_ratio(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise FFSplitError(f"{name} must be in (0, 1), got {value}")


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List the packaged real models and whether they are cached."""
    from ffsplit.models.registry import list_models

    with _user_errors():
        rows = list_models()

    def table(data: dict[str, Any]) -> Table:
        t = Table(title="packaged models")
        for col in ("name", "architecture", "params", "license", "cached", "path"):
            t.add_column(col)
        for r in data["models"]:
            t.add_row(
                r["name"],
                r["architecture"],
                f"{r['params']:,}",
                r["license"],
                "yes" if r["cached"] else "no",
                str(r.get("path") or ""),
            )
        return t

    _emit({"models": rows}, as_json, table)


@app.command()
def profile(
    model: Annotated[str, typer.Argument(help="packaged model name or local HF folder")],
    out_path: Annotated[
        Path, typer.Option("--out", help="statistics file to write (.safetensors)")
    ],
    calib_tokens: Annotated[int, typer.Option(help="calibration tokens")] = DEFAULT_CALIB_TOKENS,
    window: Annotated[int, typer.Option(help="tokens per calibration window")] = DEFAULT_WINDOW,
    corpus: Annotated[str, typer.Option(help="wikipedia, news, or a text file")] = "wikipedia",
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 4,
    no_grams: Annotated[
        bool,
        typer.Option(
            "--no-grams", help="skip Gram matrices (saves memory; no activation-aware SVD)"
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Profile every FFN neuron on calibration text and write heavy-hitter statistics."""
    from ffsplit.config import ProfileConfig
    from ffsplit.jobs import profile_job

    with _user_errors(), _output(out_path):
        config = ProfileConfig(
            corpus=corpus,
            tokens=calib_tokens,
            window=window,
            batch_size=batch_size,
            collect_grams=not no_grams,
        )
        with _progress(not as_json) as progress:
            result = profile_job(model, config, out_path, progress=progress)
    _emit(result, as_json, lambda d: _kv_table("profile", list(d.items())))


def _recipe_from_options(
    method: Method,
    heavy_ratio: float | None,
    ffn_reduction: float,
    baseline: Baseline | None,
    calib_tokens: int,
    plain_svd: bool,
    heavy_bits: int,
    gptq: bool,
    seed: int,
) -> Any:
    """The recipe `ffsplit compress` options describe. Quant FFSplit without --heavy-ratio gives
    widths per neuron from the statistics (the default that won, QuantConfig); with it, or as a
    baseline, a fixed heavy set and two adjacent light widths (--baseline outlier: --heavy-ratio
    is the share of input columns kept bf16, DEFAULT_OUTLIER_RATIO when not given)."""
    from ffsplit.config import LowRankConfig, ProfileConfig, PruneConfig, QuantConfig, Recipe

    _check_ratio("--ffn-reduction", ffn_reduction)
    selection = {
        Baseline.uniform: "none",
        Baseline.random: "random",
        Baseline.outlier: "outlier",
    }.get(baseline, "score")
    if selection == "outlier" and method != Method.quant:
        raise FFSplitError(
            f"--baseline outlier (kept bf16 input columns) applies to --method quant only, "
            f"not {method.value}: add --method quant or choose another --baseline"
        )
    if selection == "outlier" and heavy_bits != 16:
        raise FFSplitError(
            "--heavy-bits does not apply to --baseline outlier (its columns are bf16): drop it"
        )
    if heavy_ratio is not None:
        _check_ratio("--heavy-ratio", heavy_ratio)
        if selection == "none" or method == Method.prune:
            what = "pruning" if method == Method.prune else "--baseline uniform (no split)"
            raise FFSplitError(f"--heavy-ratio does not apply to {what}: drop it")
    if method == Method.prune and selection == "none":
        raise FFSplitError("--baseline uniform does not apply to pruning: drop it")
    allocated = selection == "score" and heavy_ratio is None
    compressor = {
        Method.lowrank: lambda: LowRankConfig(whiten=not plain_svd),
        Method.quant: lambda: QuantConfig(
            heavy_bits=heavy_bits,
            allocation="layer" if allocated else "two-level",
            gptq=gptq,
            gptq_down=gptq,
        ),
        Method.prune: PruneConfig,
    }[method]()
    return Recipe(
        method=compressor,
        selection=selection,
        heavy_ratio=heavy_ratio,
        ffn_reduction=ffn_reduction,
        seed=seed,
        profile=ProfileConfig(tokens=calib_tokens),
    )


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="packaged model name or local HF folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="variant folder to write")],
    method: Annotated[
        Method, typer.Option(help="how the light part is compressed")
    ] = Method.lowrank,
    heavy_ratio: Annotated[
        float | None,
        typer.Option(
            help="share of neurons kept as heavy hitters, in (0, 1) [default: "
            f"{DEFAULT_HEAVY_RATIO}; quant: sized by the bit allocation unless given; "
            f"--baseline outlier: share of input columns kept bf16, {DEFAULT_OUTLIER_RATIO}]",
            show_default=False,
        ),
    ] = None,
    ffn_reduction: Annotated[
        float, typer.Option(help="target FFN size reduction by bytes, in (0, 1)")
    ] = DEFAULT_FFN_REDUCTION,
    baseline: Annotated[
        Baseline | None,
        typer.Option(
            help="compress as a baseline instead of FFSplit (outlier: column-outlier, quant only)"
        ),
    ] = None,
    calib_tokens: Annotated[
        int, typer.Option(help="calibration tokens, when profiling here")
    ] = DEFAULT_CALIB_TOKENS,
    stats: Annotated[
        Path | None, typer.Option(help="statistics from `ffsplit profile` (else profiled here)")
    ] = None,
    plain_svd: Annotated[
        bool, typer.Option("--plain-svd", help="plain SVD instead of activation-aware")
    ] = False,
    heavy_bits: Annotated[int, typer.Option(help="quant: heavy part bits (16 or 8)")] = 16,
    gptq: Annotated[
        bool, typer.Option("--gptq/--no-gptq", help="quant: GPTQ (else round to nearest)")
    ] = True,
    seed: Annotated[int, typer.Option(help="seed for random baselines")] = 0,
    recipe_file: Annotated[
        Path | None, typer.Option("--recipe", help="recipe JSON/YAML (overrides the options above)")
    ] = None,
    heal_steps: Annotated[
        int | None,
        typer.Option(
            help="heal: distillation steps against the dense model (0 = off; per layer for "
            "--heal-loss local)"
        ),
    ] = None,
    heal_loss: Annotated[
        HealLoss | None,
        typer.Option(help="heal: 'local' (each FFN's output) or 'kl' (the model's logits)"),
    ] = None,
    heal_lr: Annotated[float | None, typer.Option(help="heal: Adam learning rate")] = None,
    heal_tokens: Annotated[
        int | None, typer.Option(help="heal: calibration tokens to distill on")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Split every FFN, compress the light part to a byte budget, write a variant folder.

    --heal-* options heal the compressed FFNs (a short distillation against the dense model on
    calibration text) before saving; given with --recipe they override its heal settings.
    """
    from ffsplit.config import Recipe
    from ffsplit.jobs import compress_job

    with _user_errors(), _output(out_dir):
        if recipe_file is not None:
            recipe = load_recipe(recipe_file)
        else:
            recipe = _recipe_from_options(
                method, heavy_ratio, ffn_reduction, baseline, calib_tokens, plain_svd,
                heavy_bits, gptq, seed,
            )  # fmt: skip
        heal = {
            "steps": heal_steps,
            "loss": None if heal_loss is None else heal_loss.value,
            "lr": heal_lr,
            "tokens": heal_tokens,
        }
        heal = {k: v for k, v in heal.items() if v is not None}
        if heal:
            recipe = Recipe.from_dict(
                {**recipe.to_dict(), "heal": {**recipe.heal.to_dict(), **heal}}, where="--heal-*"
            )
        with _progress(not as_json) as progress:
            result = compress_job(model, recipe, out_dir, stats_path=stats, progress=progress)
    _emit(result, as_json, lambda d: _kv_table(f"compress: {d['label']}", list(d.items())))


def load_recipe(path: Path) -> Any:
    """A Recipe from a JSON or YAML file; unknown keys are errors."""
    from ffsplit.config import Recipe

    if not path.is_file():
        raise FFSplitError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FFSplitError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types; yaml's span several lines
        reason = " ".join(str(exc).split())[:300]
        raise FFSplitError(
            f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} ({reason})"
        ) from None
    return Recipe.from_dict(data, where=str(path))


@app.command("eval")
def evaluate(
    model: Annotated[
        str, typer.Argument(help="packaged model name, local HF folder, or variant folder")
    ],
    text: Annotated[
        Path | None,
        typer.Option(help="plain UTF-8 text file to score (default: Wikipedia evaluation split)"),
    ] = None,
    corpus: Annotated[
        str, typer.Option(help="packaged corpus when --text is not given")
    ] = "wikipedia",
    max_tokens: Annotated[int, typer.Option(help="evaluation token budget")] = DEFAULT_EVAL_TOKENS,
    window: Annotated[int, typer.Option(help="tokens per evaluation window")] = DEFAULT_WINDOW,
    latency: Annotated[
        bool, typer.Option("--latency", help="also race the variant against its dense base (CPU)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Perplexity (or probe accuracy for encoders), parameters and bytes, optionally latency."""
    from ffsplit.jobs import evaluate_job

    with _user_errors():
        if window < 2:
            raise FFSplitError(f"--window must be at least 2 tokens, got {window}")
        if max_tokens < window:
            raise FFSplitError(
                f"--max-tokens ({max_tokens}) must be at least one --window ({window})"
            )
        with _progress(not as_json) as progress:
            result = evaluate_job(
                model,
                text=text,
                corpus=corpus,
                max_tokens=max_tokens,
                window=window,
                latency=latency,
                progress=progress,
            )

    def table(d: dict[str, Any]) -> Table:
        size = d["size"]
        rows: list[tuple[str, Any]] = [("model", d["model"])]
        if "perplexity" in d:
            rows.append(("perplexity", d["perplexity"]))
            rows.append(("eval tokens", d["eval"]["tokens"]))
        if "accuracy" in d:
            rows.append(("probe accuracy", d["accuracy"]))
        rows += [
            ("FFN reduction", d["ffn_reduction"]),
            ("FFN params", size["ffn_params"]),
            ("FFN bytes", size["ffn_bytes"]),
            ("total params", size["total_params"]),
            ("total bytes", size["total_bytes"]),
        ]
        if "latency" in d and "speedup" in d["latency"]:
            for k, v in d["latency"]["speedup"].items():
                rows.append((f"{k} speedup", v))
        return _kv_table("eval", rows)

    _emit(result, as_json, table)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
