"""A built-in 4-class text task that needs no files (offline demos and tests).

label = topic x sentiment, ids in the order of `LABEL_NAMES`:
food-neg 0, food-pos 1, sport-neg 2, sport-pos 3.

- Topic comes from the nouns (disjoint food / sport word lists).
- Sentiment comes from a topic-neutral adjective, flipped by a negator ("not", "never",
  "hardly"); in "X but Y" sentences the clause after "but" decides, and the clause before it
  carries the opposite sentiment, so a bag of adjectives is misleading.
- Topic-neutral filler words are distractors.
- Train labels have ~3% noise (a uniformly chosen wrong class); eval labels are clean.

A pretrained encoder picks up topics and plain adjectives within a few dozen steps (about 70%
accuracy: 20% of clauses are negated, 20% of sentences have a "but"), while negation and
"but" clauses need fine-tuning, which LoRA learns in a few hundred steps.
`synthetic_rule_label` is the exact labelling rule, used to check the generator.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from colora.data.errors import DataError
from colora.data.types import Task, TextDataset

LABEL_NAMES = ["food-neg", "food-pos", "sport-neg", "sport-pos"]
TOPIC_NOUNS = (
    ("soup", "pasta", "bread", "curry", "salad", "pizza", "dessert", "steak", "noodles", "cake",
     "burger", "omelette"),
    ("match", "team", "coach", "striker", "race", "tournament", "referee", "league", "goalkeeper",
     "season", "defence", "final"),
)
POSITIVE = ("great", "excellent", "wonderful", "superb", "brilliant", "fantastic", "impressive",
            "lovely", "outstanding", "pleasant")
NEGATIVE = ("awful", "terrible", "dreadful", "disappointing", "poor", "mediocre", "horrible",
            "dull", "miserable", "weak")
NEGATORS = ("not", "never", "hardly")
VERBS = ("was", "is", "seemed", "felt")  # the first two are the copulas
INTENSIFIERS = ("really", "quite", "truly", "rather", "very")
PREFIXES = ("honestly,", "yesterday", "last week", "to be fair,", "i think", "as expected",
            "on sunday", "frankly,", "apparently")
SUFFIXES = ("in the city", "with my friends", "this time", "as usual", "again", "overall",
            "according to everyone", "on the whole")
TRAIN_LABEL_NOISE = 0.03
P_NEGATED = 0.2
P_BUT = 0.2


def _clause(rng: np.random.Generator, topic: int, sentiment: int) -> str:
    noun = rng.choice(TOPIC_NOUNS[topic])
    if rng.random() < P_NEGATED:
        # A negated adjective of the opposite polarity: "not great" is negative. Only the
        # copula reads naturally before a negator ("was never great", not "felt never great").
        adj = rng.choice(NEGATIVE if sentiment else POSITIVE)
        return f"the {noun} {rng.choice(VERBS[:2])} {rng.choice(NEGATORS)} {adj}"
    verb = rng.choice(VERBS)
    adj = rng.choice(POSITIVE if sentiment else NEGATIVE)
    mod = f"{rng.choice(INTENSIFIERS)} " if rng.random() < 0.3 else ""
    return f"the {noun} {verb} {mod}{adj}"


def synthetic_sentence(rng: np.random.Generator, label: int) -> str:
    """One sentence whose true class (by `synthetic_rule_label`) is `label`."""
    topic, sentiment = divmod(int(label), 2)
    if rng.random() < P_BUT:
        body = f"{_clause(rng, topic, 1 - sentiment)} but {_clause(rng, topic, sentiment)}"
    else:
        body = _clause(rng, topic, sentiment)
    if rng.random() < 0.4:
        body = f"{rng.choice(PREFIXES)} {body}"
    if rng.random() < 0.4:
        body = f"{body} {rng.choice(SUFFIXES)}"
    return body + " ."


def synthetic_rule_label(sentence: str) -> int:
    """The labelling rule: topic from the nouns, sentiment from the (last) clause after "but"."""
    words = [w.strip(",.") for w in sentence.lower().split()]
    if any(w in TOPIC_NOUNS[0] for w in words):
        topic = 0
    elif any(w in TOPIC_NOUNS[1] for w in words):
        topic = 1
    else:
        raise DataError(f"synthetic_rule_label: no topic word in {sentence!r}")
    clause = words[len(words) - words[::-1].index("but"):] if "but" in words else words
    polarity = [1 for w in clause if w in POSITIVE] + [0 for w in clause if w in NEGATIVE]
    if len(polarity) != 1:
        raise DataError(f"synthetic_rule_label: expected one sentiment word in {sentence!r}")
    sentiment = polarity[0]
    if any(w in NEGATORS for w in clause):
        sentiment = 1 - sentiment
    return 2 * topic + sentiment


def make_synthetic(
    n: int, seed: int | Sequence[int], label_noise: float = 0.0
) -> tuple[list[str], list[int]]:
    """`n` sentences and labels, deterministic in `seed`; `label_noise` of them get a wrong label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(LABEL_NAMES), size=n)
    texts = [synthetic_sentence(rng, y) for y in labels]
    noisy = rng.random(n) < label_noise
    # Shift by 1..3 so a noisy label is always a different class.
    labels = np.where(noisy, (labels + rng.integers(1, len(LABEL_NAMES), size=n)) % len(LABEL_NAMES), labels)
    return texts, [int(y) for y in labels]


def load_synthetic(task_kind: str, seed: int, n_train: int, n_eval: int) -> Task:
    """The synthetic task; for causal-lm the same sentences are plain text with no labels."""
    for key, n in (("synthetic_train", n_train), ("synthetic_eval", n_eval)):
        if n < 1:
            raise DataError(f"data.{key}={n}: must be at least 1")
    # Separate seed streams so the eval set does not change when the train size does.
    train_x, train_y = make_synthetic(n_train, [seed, 0], TRAIN_LABEL_NOISE)
    eval_x, eval_y = make_synthetic(n_eval, [seed, 1], 0.0)
    if task_kind == "causal-lm":
        return Task("synthetic", "causal-lm", 0, [], TextDataset(train_x), TextDataset(eval_x), [])
    return Task(
        name="synthetic",
        kind="seq-cls",
        num_labels=len(LABEL_NAMES),
        label_names=list(LABEL_NAMES),
        train=TextDataset(train_x, None, train_y),
        eval=TextDataset(eval_x, None, eval_y),
        metric_names=["accuracy"],
    )
