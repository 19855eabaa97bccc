"""WordNet 3.0 in the WNDB format (Debian's ``wordnet-base``: ``/usr/share/wordnet``) through NLTK's reader.

Relations among the terms asked for, from their noun senses:

- ``IsA``: a hypernym (or instance hypernym) of the head, up to :data:`MAX_HYPERNYM_DEPTH` steps up,
  has the tail among its lemmas;
- ``PartOf``: part holonyms of the head / part meronyms of the tail;
- ``MadeOf``: substance meronyms of the head / substance holonyms of the tail.

NLTK's :class:`~nltk.corpus.reader.wordnet.WordNetCorpusReader` expects a ``lexnames`` file that
``wordnet-base`` does not ship; :class:`_WNDBReader` supplies WordNet 3.0's 45 lexicographer file
names (the ``lexnames(5WN)`` table) for it and skips the mapping to WordNet 3.0 that NLTK builds for
multilingual data (this *is* 3.0, and no Open Multilingual Wordnet is used). NLTK only reads
folders on its data path, so the folder is appended to ``nltk.data.path``.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Iterable

from conceptrank.errors import KnowledgeGraphError
from conceptrank.io.kg.conceptnet import merge_edges
from conceptrank.io.kg.edges import KGRead

__all__ = ["read_wordnet", "is_wordnet_dir", "DEFAULT_WORDNET", "MAX_HYPERNYM_DEPTH", "LEXNAMES"]

DEFAULT_WORDNET = Path("/usr/share/wordnet")
MAX_HYPERNYM_DEPTH = 6
REQUIRED_FILES = ("data.noun", "index.noun")

#: WordNet 3.0's lexicographer files, in number order (lexnames(5WN)).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_SYNTACTIC = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def is_wordnet_dir(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES)


def _lexnames_text() -> str:
    return "".join(f"{i:02d}\t{n}\t{_SYNTACTIC[n.split('.')[0]]}\n" for i, n in enumerate(LEXNAMES))


def _reader(root: Path):
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _WNDBReader(WordNetCorpusReader):
        def open(self, file):
            if file == "lexnames" and not os.path.exists(os.path.join(str(self._root), "lexnames")):
                return io.StringIO(_lexnames_text())
            return super().open(file)

        def map_wn(self, version="wordnet"):
            return None

    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": none are used
        return _WNDBReader(str(root), None)


def _synset_edges(wn, term: str, terms: frozenset[str]) -> list[tuple[str, str, str, float, str]]:
    def lemmas(s) -> set[str]:
        return {name.lower() for name in s.lemma_names()} & terms

    rows = []
    for s in wn.synsets(term, pos="n"):
        frontier, seen = [s], {s}
        for _ in range(MAX_HYPERNYM_DEPTH):
            frontier = [h for x in frontier for h in x.hypernyms() + x.instance_hypernyms() if h not in seen]
            seen.update(frontier)
            rows += [(term, "IsA", u, 1.0, "wordnet") for h in frontier for u in lemmas(h)]
        rows += [(term, "PartOf", u, 1.0, "wordnet") for h in s.part_holonyms() for u in lemmas(h)]
        rows += [(u, "PartOf", term, 1.0, "wordnet") for m in s.part_meronyms() for u in lemmas(m)]
        rows += [(term, "MadeOf", u, 1.0, "wordnet") for m in s.substance_meronyms() for u in lemmas(m)]
        rows += [(u, "MadeOf", term, 1.0, "wordnet") for h in s.substance_holonyms() for u in lemmas(h)]
    return [r for r in rows if r[0] != r[2]]


def read_wordnet(root: str | os.PathLike, terms: Iterable[str]) -> KGRead:
    """IsA / PartOf / MadeOf edges among ``terms`` from a WNDB folder (``/usr/share/wordnet``)."""
    root = Path(root)
    if not is_wordnet_dir(root):
        missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
        raise KnowledgeGraphError(f"{root}: not a WordNet database folder (missing {', '.join(missing)}); "
                                  "on Debian/Ubuntu `apt-get install wordnet-base` installs one in /usr/share/wordnet")
    try:
        import nltk  # noqa: F401
    except ImportError:
        raise KnowledgeGraphError("reading WordNet needs NLTK: pip install nltk") from None
    terms = frozenset(terms)
    try:
        wn = _reader(root)
        matched = frozenset(t for t in terms if wn.synsets(t, pos="n"))
        rows = [r for t in sorted(matched) for r in _synset_edges(wn, t, terms)]
    except (OSError, ValueError, UnicodeDecodeError, AssertionError) as e:
        raise KnowledgeGraphError(f"{root}: cannot read the WordNet database ({type(e).__name__}: {e})") from None
    edges = merge_edges(rows)
    return KGRead(path=str(root), format="wordnet", edges=edges, kept=len(rows), matched_terms=matched)
