"""CIDEr-D as computed by the COCO caption evaluation (pycocoevalcap `Cider`), plus its tokenisation.

The COCO tool's metric named "CIDEr" is in fact CIDEr-D: n-grams n = 1..4 weighted by tf-idf, where the document
frequency of an n-gram is the number of *samples* whose reference set contains it and the idf is
log(#samples) - log(max(1, df)); per n the clipped cosine similarity min(c, r) * r / (|c| |r|) between candidate
and each reference, times a gaussian length penalty exp(-(l_c - l_r)^2 / (2 sigma^2)) with sigma = 6 where the
length is the number of *bigrams* (as the COCO code counts it); the mean over n, averaged over the references,
times 10. The corpus score is the mean over samples.

Because the idf comes from the evaluated corpus itself, a score depends on which samples are scored together,
and a corpus of one sample scores 0 (log 1 = 0): compare CIDEr only between runs over the same sample set.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

# The COCO tool runs the Stanford PTB tokenizer (lower-cased) and then drops these punctuation tokens.
_COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# A pure-Python approximation of PTB tokenisation (no Java): decimal numbers stay whole (object coordinates such
# as 1088.3), clitics split off as in PTB ("what's" -> "what", "'s"), every other symbol is its own token.
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)+|'\w+|\w+|\.\.\.|--|[^\w\s]")


def coco_tokenize(text: str) -> List[str]:
    """Lower-case and split `text` the way the COCO caption evaluation sees it (punctuation removed)."""
    if not isinstance(text, str):
        raise TypeError(f"coco_tokenize expects a string, got {type(text).__name__}")
    return [tok for tok in _TOKEN_RE.findall(text.lower()) if tok not in _COCO_PUNCTUATION]


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


@dataclass(frozen=True)
class CiderResult:
    score: float
    per_sample: List[float]


class _TfIdf:
    def __init__(self, document_frequency: Counter, num_docs: int, n: int):
        self.df = document_frequency
        self.log_num_docs = math.log(float(num_docs))
        self.n = n

    def vector(self, counts: Counter) -> Tuple[List[Dict[tuple, float]], List[float], int]:
        vec: List[Dict[tuple, float]] = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        bigrams = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            # An n-gram unseen in the references gets df 1, i.e. the full idf, like the COCO code.
            weight = float(tf) * (self.log_num_docs - math.log(max(1.0, self.df.get(gram, 0.0))))
            vec[k][gram] = weight
            norm[k] += weight * weight
            if k == 1:
                bigrams += tf
        return vec, [math.sqrt(v) for v in norm], bigrams


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> CiderResult:
    """CIDEr-D of each candidate against its references (tf-idf over this reference corpus) and their mean.

    `references[i]` is the list of reference strings of `candidates[i]` (at least one each).
    """
    if len(candidates) != len(references):
        raise ValueError(f"cider_d: {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("cider_d: no candidates to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"cider_d: references[{i}] must be a non-empty list of strings, got {refs!r}")

    cand_counts = [_ngram_counts(coco_tokenize(c), n) for c in candidates]
    ref_counts = [[_ngram_counts(coco_tokenize(r), n) for r in refs] for refs in references]

    df: Counter = Counter()
    for refs in ref_counts:
        for gram in set(g for r in refs for g in r):
            df[gram] += 1
    tfidf = _TfIdf(df, len(ref_counts), n)

    per_sample: List[float] = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec_c, norm_c, len_c = tfidf.vector(cand)
        total = 0.0
        for ref in refs:
            vec_r, norm_r, len_r = tfidf.vector(ref)
            penalty = math.exp(-((len_c - len_r) ** 2) / (2.0 * sigma**2))
            sims = 0.0
            for k in range(n):
                # Clipping: repeating a matching n-gram cannot earn more than the reference holds.
                dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_c[k].items())
                if norm_c[k] != 0.0 and norm_r[k] != 0.0:
                    dot /= norm_c[k] * norm_r[k]
                sims += dot * penalty
            total += sims / n
        per_sample.append(10.0 * total / len(refs))
    return CiderResult(score=sum(per_sample) / len(per_sample), per_sample=per_sample)
