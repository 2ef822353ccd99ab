"""docs/results.md from the MLflow runs of the project's flows (issue 6): never typed by hand.

- readers.py, the only part that talks to MLflow: every complete, FINISHED run of the experiments
  'ffsplit/<base model>' becomes a plain `Row` (its recipe rebuilt from the run's params, so
  series, label and heavy ratio come from ffsplit.config.Recipe; metrics as logged; tags),
  deduplicated by variant key (the same variant registered by two sweeps counts once; the latest
  run wins); observation runs become `ObservationRun`s.
- tables.py, pure functions of rows: the dense references, the trade-off at equal FFN budget
  against every baseline (method.md, "Baselines that a result must beat"), the places where
  FFSplit does not beat a baseline, the heavy-ratio sweep and whether its best ratio transfers
  between models, the goals check, healing pairs.
- render.py (observation.py for its observation section), the page: one function per section,
  the charts through reports.plots.loss_chart; format.py, how numbers and tables are written;
  rows.py, the records and thresholds they share.

Quality loss is the logged perplexity_change_pct (perplexity increase over the dense model of the
same sweep's evaluation, in %), or minus accuracy_change_pct for encoders (tracking.registry's
quality_loss); lower is better. Sizes that the sweep does not log are derived from the model's
dense run: whole-model size reduction = 1 - bytes / dense bytes; FFN parameter reduction =
(dense parameters - parameters) / dense FFN parameters, with dense FFN parameters = dense FFN bytes
/ 2 (every dense float weight counts 2 bytes, ffsplit/eval/size.py), since only the FFN changes.

Probe noise: an encoder's accuracy is a linear probe's on n labelled test examples, so it carries a
binomial standard error sqrt(p(1-p)/n) (about 1.3 points for MiniLM's 1500 tweets). Accuracy cells
show p ± 1.96 se, and two accuracies whose difference is below 1.96 sqrt(se_a^2 + se_b^2) are
"within noise": neither a win nor a loss (`compare`). n is the run's metric accuracy_test_examples,
else record["eval"]["test"] of its eval/record.json artifact, else unknown (and then not judged).
Perplexity is compared as logged: the evaluation text is fixed and the number is deterministic.
"""

from reports.results.format import (
    fmt_budget,
    fmt_loss,
    fmt_pct,
    fmt_points,
    fmt_quality,
    slug,
)
from reports.results.observation import (
    ablation_effect,
    observation_ablation_table,
    observation_layer_table,
    observation_section,
)
from reports.results.readers import (
    dedupe,
    read_rows,
    recipe_from_params,
    row_from_run,
    setting_of,
)
from reports.results.render import render, write_page
from reports.results.rows import (
    BASELINE_SERIES,
    FFSPLIT_SERIES,
    GOAL_QUALITY_PCT,
    GOAL_REDUCTION,
    SERIES_TITLES,
    ObservationRun,
    Row,
    Source,
    record_test_examples,
)
from reports.results.tables import (
    COLUMNS,
    BudgetLine,
    Column,
    Comparison,
    Goal,
    Shortfall,
    Transfer,
    beats,
    best,
    best_ratio,
    best_ratio_overall,
    cell,
    compare,
    dense_references,
    goals,
    healing_pairs,
    heavy_ratio_curves,
    noise_between,
    ranks,
    shortfalls,
    tradeoff,
    transfer,
    with_reference,
    within_noise,
)

__all__ = [
    "BASELINE_SERIES",
    "COLUMNS",
    "FFSPLIT_SERIES",
    "GOAL_QUALITY_PCT",
    "GOAL_REDUCTION",
    "SERIES_TITLES",
    "BudgetLine",
    "Column",
    "Comparison",
    "Goal",
    "ObservationRun",
    "Row",
    "Shortfall",
    "Source",
    "Transfer",
    "ablation_effect",
    "beats",
    "best",
    "best_ratio",
    "best_ratio_overall",
    "cell",
    "compare",
    "dedupe",
    "dense_references",
    "fmt_budget",
    "fmt_loss",
    "fmt_pct",
    "fmt_points",
    "fmt_quality",
    "goals",
    "healing_pairs",
    "heavy_ratio_curves",
    "noise_between",
    "observation_ablation_table",
    "observation_layer_table",
    "observation_section",
    "ranks",
    "read_rows",
    "recipe_from_params",
    "record_test_examples",
    "render",
    "row_from_run",
    "setting_of",
    "shortfalls",
    "slug",
    "tradeoff",
    "transfer",
    "with_reference",
    "within_noise",
    "write_page",
]
