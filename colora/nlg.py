"""Generation and NLG metrics for data-to-text tasks (E2E): BLEU, NIST, ROUGE-L, CIDEr, METEOR.

Greedy decoding of the first ``eval.generate`` distinct meaning representations of the eval split,
each scored against ALL its references (E2E has several per input). Metrics come from maintained
packages, the ``nlg`` extra (``pip install colora[nlg]``):

- ``eval/bleu``: sacrebleu corpus BLEU (13a tokenization, lowercased), 0-100;
- ``eval/nist``: nltk's corpus NIST, n = 5 (as mteval); 0 when the outputs are too short to hold
  n-grams of every order;
- ``eval/rouge_l``, ``eval/cider``: pycocoevalcap's ROUGE-L (beta 1.2) and CIDEr, as the E2E
  challenge's scripts use them;
- ``eval/meteor``: nltk's METEOR, only where the WordNet data is installed; it does not come from
  PyPI and cannot be fetched offline, so the metric is usually absent.

A metric whose package is missing is left out (the run goes on). Texts are lowercased and split
into words and punctuation before NIST, ROUGE-L, CIDEr and METEOR.
"""

from __future__ import annotations

import re

import torch

from .data import TextDataset

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def grouped_references(data: TextDataset, n: int) -> list[tuple[str, list[str]]]:
    """The first ``n`` distinct inputs of ``data`` (in file order), each with all its references."""
    groups: dict[str, list[str]] = {}
    for source, target in zip(data.text_a, data.text_b or []):
        if source not in groups:
            if len(groups) == n:
                continue
            groups[source] = []
        groups[source].append(target)
    return list(groups.items())


@torch.no_grad()
def generate(model, tokenizer, sources: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``source + " ||"`` (the prompt format of ``train.encode``), one at a
    time (no padding: a handful of examples, and tiny models)."""
    model.eval()
    out = []
    for source in sources:
        ids = torch.tensor([tokenizer(source + " ||")["input_ids"]], device=next(model.parameters()).device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def nlg_metrics(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus-level metrics of ``hypotheses`` against their reference lists (see module doc)."""
    out: dict[str, float] = {}
    try:
        import sacrebleu

        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(max(map(len, references)))]
        out["eval/bleu"] = float(sacrebleu.corpus_bleu(hypotheses, streams, lowercase=True).score)
    except ImportError:
        pass
    hyp_tok = [_tokens(h) for h in hypotheses]
    ref_tok = [[_tokens(r) for r in refs] for refs in references]
    try:
        from nltk.translate.nist_score import corpus_nist

        try:
            out["eval/nist"] = float(corpus_nist(ref_tok, hyp_tok, n=5))
        except ZeroDivisionError:  # no n-gram of some order in any output
            out["eval/nist"] = 0.0
    except ImportError:
        pass
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(ref_tok)}
        res = {i: [" ".join(h)] for i, h in enumerate(hyp_tok)}
        out["eval/rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        out["eval/cider"] = float(Cider().compute_score(gts, res)[0])
    except ImportError:
        pass
    try:
        from nltk.corpus import wordnet
        from nltk.translate.meteor_score import meteor_score

        wordnet.ensure_loaded()  # LookupError without the WordNet data (not on PyPI; offline: absent)
        scores = [meteor_score(refs, hyp) for refs, hyp in zip(ref_tok, hyp_tok)]
        out["eval/meteor"] = float(sum(scores) / len(scores))
    except (ImportError, LookupError):  # LookupError: WordNet data not installed (offline)
        pass
    return out


def generation_metrics(model, tokenizer, data: TextDataset, n: int, max_new_tokens: int) -> dict[str, float]:
    """Generate for the first ``n`` distinct inputs of ``data`` and score them."""
    groups = grouped_references(data, n)
    hypotheses = generate(model, tokenizer, [source for source, _ in groups], max_new_tokens)
    return nlg_metrics(hypotheses, [refs for _, refs in groups])
