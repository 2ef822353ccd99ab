"""Packaged text corpora, their disjoint calibration/evaluation split, and fixed token windows."""

from ffsplit.data.corpora import (
    CORPORA,
    SPLITS,
    TWEET_LABELS,
    documents,
    labelled_texts,
    read_text_file,
)
from ffsplit.data.windows import (
    CorpusRef,
    calibration_windows,
    corpus_windows,
    evaluation_windows,
    token_windows,
)

__all__ = [
    "CORPORA",
    "SPLITS",
    "TWEET_LABELS",
    "CorpusRef",
    "calibration_windows",
    "corpus_windows",
    "documents",
    "evaluation_windows",
    "labelled_texts",
    "read_text_file",
    "token_windows",
]
