import collections
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from colora.data import DataError, load_task, make_synthetic, synthetic_rule_label
from colora.data.synthetic import NEGATORS

# The repo is cloned next to a `shared/` folder holding real GLUE and E2E files.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GLUE = SHARED / "glue"


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    assert path.exists(), f"shared test data missing: {path}"
    return path


def data_lines(path: Path) -> list[str]:
    """Non-empty lines, read independently of the loaders (plain split, no csv module)."""
    return [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]


# Row counts of the shared GLUE files, counted as non-empty lines minus the header (CoLA has
# none; its dev.tsv lacks a final newline, so `wc -l` shows 1042). Every row of these copies
# has the right number of columns, so no row is skipped.
@pytest.mark.parametrize(
    "name, folder, n_train, n_eval, header",
    [
        ("glue/mrpc", "MRPC", 3667, 408, True),
        ("glue/sst-2", "SST-2", 67349, 872, True),
        ("glue/cola", "CoLA", 8551, 1043, False),
        ("glue/sts-b", "STS-B", 5749, 1500, True),
    ],
)
def test_glue_row_counts_match_the_files(name, folder, n_train, n_eval, header):
    task = load_task(name, str(shared("glue", folder)))
    assert len(task.train) == n_train == len(data_lines(GLUE / folder / "train.tsv")) - header
    assert len(task.eval) == n_eval == len(data_lines(GLUE / folder / "dev.tsv")) - header
    assert task.kind == "seq-cls"


def test_mrpc():
    task = load_task("glue/mrpc", str(shared("glue", "MRPC")))
    assert task.name == "glue/mrpc"
    assert task.num_labels == 2
    assert task.label_names == ["not_equivalent", "equivalent"]
    assert task.metric_names == ["accuracy", "f1"]
    # The header's byte-order mark must not end up in a column name or the first example.
    assert task.train.text_a[0] == (
        'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .'
    )
    assert task.train.text_b[0] == (
        'Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting his evidence .'
    )
    assert task.train.labels[:2] == [1, 0]
    assert collections.Counter(task.train.labels) == {1: 2473, 0: 1194}
    independent = collections.Counter(int(line.split("\t")[0]) for line in data_lines(GLUE / "MRPC" / "train.tsv")[1:])
    assert collections.Counter(task.train.labels) == independent
    assert collections.Counter(task.eval.labels) == {1: 279, 0: 129}


def test_sst2():
    task = load_task("glue/sst2", str(shared("glue", "SST-2")))
    assert task.name == "glue/sst2"
    assert task.label_names == ["negative", "positive"]
    assert task.metric_names == ["accuracy"]
    assert task.train.text_b is None
    assert task.train.text_a[0] == "hide new secretions from the parental units"
    assert task.eval.text_a[0] == "it 's a charming and often affecting journey ."
    assert collections.Counter(task.train.labels) == {1: 37569, 0: 29780}
    assert collections.Counter(task.eval.labels) == {1: 444, 0: 428}


def test_cola_has_no_header():
    task = load_task("glue/cola", str(shared("glue", "CoLA")))
    assert task.label_names == ["unacceptable", "acceptable"]
    assert task.metric_names == ["mcc"]
    assert task.train.text_a[0] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert task.eval.text_a[-1] == "John talked to Bill about himself."
    assert collections.Counter(task.train.labels) == {1: 6023, 0: 2528}
    assert collections.Counter(task.eval.labels) == {1: 721, 0: 322}


def test_stsb_is_regression():
    task = load_task("glue/sts-b", str(shared("glue", "STS-B")))
    assert task.name == "glue/stsb"
    assert task.num_labels == 1 and task.is_regression
    assert task.metric_names == ["pearson", "spearman"]
    assert (task.train.text_a[0], task.train.text_b[0], task.train.labels[0]) == (
        "A plane is taking off.", "An air plane is taking off.", 5.0,
    )
    assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for y in task.train.labels)
    independent = [float(line.split("\t")[-1]) for line in data_lines(GLUE / "STS-B" / "dev.tsv")[1:]]
    assert task.eval.labels == pytest.approx(independent)


def test_glue_root_folder_is_accepted():
    task = load_task("glue/mrpc", str(shared("glue")))
    assert len(task.train) == 3667


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_rte_string_labels_quotes_and_malformed_rows(tmp_path):
    header = "index\tsentence1\tsentence2\tlabel"
    write(tmp_path / "train.tsv", [
        header,
        '0\tHe said "yes.\tHe agreed.\tentailment',
        "1\tA cat sat.\tA dog sat.\tnot_entailment",
        "2\tthis row is broken\tnot_entailment",
        '3\tShe left " early\tShe stayed.\tnot_entailment',
    ])
    write(tmp_path / "dev.tsv", [header, "0\tA.\tB.\tentailment"])
    task = load_task("glue/rte", str(tmp_path))
    assert task.label_names == ["entailment", "not_entailment"]
    assert task.train.text_a == ['He said "yes.', "A cat sat.", 'She left " early']
    assert task.train.text_b == ["He agreed.", "A dog sat.", "She stayed."]
    assert task.train.labels == [0, 1, 1]
    assert task.eval.labels == [0]


def test_qnli(tmp_path):
    header = "index\tquestion\tsentence\tlabel"
    write(tmp_path / "train.tsv", [header, "0\tWho?\tHim.\tnot_entailment", "1\tWhat?\tThat.\tentailment"])
    write(tmp_path / "dev.tsv", [header, "0\tWhy?\tBecause.\tentailment"])
    task = load_task("glue/qnli", str(tmp_path))
    assert task.train.text_a == ["Who?", "What?"]
    assert task.train.text_b == ["Him.", "That."]
    assert task.train.labels == [1, 0]
    assert task.metric_names == ["accuracy"]


def test_qqp(tmp_path):
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    write(tmp_path / "train.tsv", [
        header,
        "0\t1\t2\tHow do I cook rice?\tHow to cook rice?\t1",
        "1\t3\t4\tWhat is AI?\tWho won?\t0",
        "2\t5\t6\ta question split over\t",
        "lines\t0",
    ])
    write(tmp_path / "dev.tsv", [header, "0\t1\t2\tA?\tB?\t0"])
    task = load_task("glue/qqp", str(tmp_path))
    assert task.label_names == ["not_duplicate", "duplicate"]
    assert task.metric_names == ["accuracy", "f1"]
    assert task.train.text_a == ["How do I cook rice?", "What is AI?"]
    assert task.train.labels == [1, 0]


def test_mnli_uses_dev_matched_and_gold_label(tmp_path):
    base = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2"]
    train_header = "\t".join(base + ["label1", "gold_label"])
    dev_header = "\t".join(base + ["label1", "label2", "label3", "label4", "label5", "gold_label"])

    def row(i, a, b, labels):
        return "\t".join([str(i), "p", "q", "fiction", "(", ")", "(", ")", a, b] + labels)

    write(tmp_path / "train.tsv", [
        train_header,
        row(0, "A man eats.", "Someone eats.", ["entailment", "entailment"]),
        row(1, "A man eats.", "Nobody eats.", ["contradiction", "contradiction"]),
        row(2, "A man eats.", "He is hungry.", ["neutral", "neutral"]),
    ])
    write(tmp_path / "dev_matched.tsv", [
        dev_header,
        row(0, "It rains.", "It is wet.", ["entailment"] * 5 + ["entailment"]),
        row(1, "It rains.", "It is dry.", ["neutral", "contradiction", "entailment", "neutral", "contradiction", "-"]),
    ])
    task = load_task("glue/mnli", str(tmp_path))
    assert task.label_names == ["contradiction", "entailment", "neutral"]
    assert task.num_labels == 3
    assert task.train.labels == [1, 0, 2]
    assert task.train.text_b == ["Someone eats.", "Nobody eats.", "He is hungry."]
    # The "-" row (no annotator consensus) has no label and is skipped.
    assert task.eval.labels == [1]
    (tmp_path / "dev_matched.tsv").unlink()
    write(tmp_path / "dev.tsv", [dev_header])
    with pytest.raises(DataError, match="dev_matched.tsv"):
        load_task("glue/mnli", str(tmp_path))


def test_glue_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        load_task("glue/mrpc", str(missing))
    write(tmp_path / "train.tsv", ["sentence\tlabel", "good\t1"])
    with pytest.raises(DataError, match="dev.tsv"):
        load_task("glue/sst2", str(tmp_path))
    write(tmp_path / "dev.tsv", ["sentence\tlabel", "only one column"])
    with pytest.raises(DataError, match="no well-formed rows"):
        load_task("glue/sst2", str(tmp_path))
    write(tmp_path / "dev.tsv", ["sentence\tlabel", "fine\tmaybe"])
    with pytest.raises(DataError, match="'maybe'"):
        load_task("glue/sst2", str(tmp_path))
    write(tmp_path / "dev.tsv", ["text\tlabel", "fine\t1"])
    with pytest.raises(DataError, match="'sentence'"):
        load_task("glue/sst2", str(tmp_path))
    with pytest.raises(DataError, match="glue/wnli"):
        load_task("glue/wnli", str(tmp_path))
    with pytest.raises(DataError, match="'imagenet'"):
        load_task("imagenet", None)
    with pytest.raises(DataError, match="seq-cls"):
        load_task("glue/sst2", str(tmp_path), task_kind="causal-lm")
    with pytest.raises(DataError, match="'regression'"):
        load_task("synthetic", None, task_kind="regression")


def test_hub_unreachable_becomes_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="hub.*data.path"):
        load_task("glue/mrpc", None)
    with pytest.raises(DataError, match="hub.*data.path"):
        load_task("e2e", None)


def test_e2e_shared_folder_without_train_file():
    task = load_task("e2e", str(shared("e2e")))
    assert task.kind == "causal-lm" and task.num_labels == 0 and task.metric_names == []
    # No train.txt: train = valid.txt, eval = test.txt.
    assert len(task.train) == len(data_lines(SHARED / "e2e" / "valid.txt")) == 4672
    assert len(task.eval) == len(data_lines(SHARED / "e2e" / "test.txt")) == 4693
    assert task.train.labels is None and task.eval.labels is None
    assert task.train.text_a[0] == "name : Alimentum | area : city centre | family friendly : no"
    assert task.train.text_b[0] == "There is a place in the city centre , Alimentum , that is not family - friendly ."


def test_e2e_file_choice_and_skipped_lines(tmp_path):
    write(tmp_path / "train.txt", ["name : A||A is nice .", "a line without separator", "name : B || B is ok ."])
    write(tmp_path / "test.txt", ["name : T||T ."])
    task = load_task("e2e", str(tmp_path))
    assert task.train.text_a == ["name : A", "name : B"]
    assert task.train.text_b == ["A is nice .", "B is ok ."]
    assert task.eval.text_a == ["name : T"]
    write(tmp_path / "valid.txt", ["name : V||V .", "name : W||W ."])
    assert load_task("e2e", str(tmp_path)).eval.text_a == ["name : V", "name : W"]
    with pytest.raises(DataError, match="no such folder"):
        load_task("e2e", str(tmp_path / "missing"))
    only_test = tmp_path / "only_test"
    write(only_test / "test.txt", ["a||b"])
    with pytest.raises(DataError, match="valid.txt"):
        load_task("e2e", str(only_test))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write(path, [json.dumps(r) for r in rows])


def test_jsonl_string_labels_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [
        {"text": "good", "other": "x", "label": "pos"},
        {"text": "bad", "other": "y", "label": "neg"},
        {"text": "meh", "other": "z", "label": "pos"},
    ])
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "fine", "other": "w", "label": "pos"}])
    task = load_task("jsonl", str(tmp_path), text_pair_column="other")
    assert task.name == "jsonl"
    assert task.label_names == ["neg", "pos"]
    assert task.train.labels == [1, 0, 1]
    assert task.train.text_b == ["x", "y", "z"]
    assert task.eval.labels == [1]
    assert task.metric_names == ["accuracy", "f1"]


def test_jsonl_int_and_regression_labels_and_test_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"body": f"t{i}", "y": i % 3} for i in range(9)])
    write_jsonl(tmp_path / "test.jsonl", [{"body": "e", "y": 2}])
    task = load_task("jsonl", str(tmp_path), text_column="body", label_column="y")
    assert task.num_labels == 3 and task.label_names == ["0", "1", "2"]
    assert task.train.labels == [0, 1, 2] * 3
    assert task.metric_names == ["accuracy"]
    assert task.eval.text_a == ["e"]
    # More than 20 distinct real values: a regression target.
    write_jsonl(tmp_path / "train.jsonl", [{"body": f"t{i}", "y": i / 7} for i in range(25)])
    task = load_task("jsonl", str(tmp_path), text_column="body", label_column="y")
    assert task.num_labels == 1 and task.metric_names == ["pearson", "spearman"]
    assert task.train.labels[7] == pytest.approx(1.0)


def test_jsonl_errors(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"txt": "b", "label": 1}])
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "c", "label": 1}])
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: no column 'text'"):
        load_task("jsonl", str(tmp_path))
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "c", "label": "z"}])
    with pytest.raises(DataError, match=r"dev\.jsonl, line 1: label 'z'"):
        load_task("jsonl", str(tmp_path))
    write(tmp_path / "dev.jsonl", ["{not json"])
    with pytest.raises(DataError, match="invalid JSON"):
        load_task("jsonl", str(tmp_path))
    (tmp_path / "dev.jsonl").unlink()
    with pytest.raises(DataError, match="test.jsonl"):
        load_task("jsonl", str(tmp_path))
    with pytest.raises(DataError, match="data.path is required"):
        load_task("jsonl", None)


def test_csv(tmp_path):
    write(tmp_path / "train.csv", [
        "sentence,label,extra",
        '"hello, world",spam,1',
        "plain text,ham,2",
        '"she said ""hi""",spam,3',
    ])
    write(tmp_path / "dev.csv", ["sentence,label,extra", "x,ham,4"])
    task = load_task("csv", str(tmp_path), text_column="sentence")
    assert task.train.text_a == ["hello, world", "plain text", 'she said "hi"']
    assert task.label_names == ["ham", "spam"]
    assert task.train.labels == [1, 0, 1]
    assert task.eval.labels == [0]
    # CSV values are strings; integer-looking labels are class ids.
    ints = load_task("csv", str(tmp_path), text_column="sentence", label_column="extra")
    assert ints.train.labels == [1, 2, 3] and ints.num_labels == 5
    with pytest.raises(DataError, match=r"train\.csv: no column 'text'"):
        load_task("csv", str(tmp_path))
    lm = load_task("csv", str(tmp_path), task_kind="causal-lm", text_column="sentence", text_pair_column="extra")
    assert lm.kind == "causal-lm" and lm.train.labels is None
    assert lm.train.text_b == ["1", "2", "3"]


def test_max_train_keeps_the_first_examples():
    full = load_task("synthetic", None, synthetic_train=50, synthetic_eval=10)
    cut = load_task("synthetic", None, synthetic_train=50, synthetic_eval=10, max_train=7)
    assert cut.train.text_a == full.train.text_a[:7]
    assert cut.train.labels == full.train.labels[:7]
    assert cut.eval.text_a == full.eval.text_a
    with pytest.raises(DataError, match="max_train=0"):
        load_task("synthetic", None, max_train=0)


def test_synthetic_is_deterministic_balanced_and_seed_dependent():
    a = load_task("synthetic", None, seed=3)
    b = load_task("synthetic", None, seed=3)
    c = load_task("synthetic", None, seed=4)
    assert (len(a.train), len(a.eval)) == (2000, 500)
    assert a.train.text_a == b.train.text_a and a.train.labels == b.train.labels
    assert a.eval.text_a == b.eval.text_a
    assert a.train.text_a != c.train.text_a
    assert a.label_names == ["food-neg", "food-pos", "sport-neg", "sport-pos"]
    assert a.num_labels == 4 and a.metric_names == ["accuracy"]
    for ds in (a.train, a.eval):
        counts = np.bincount(ds.labels, minlength=4) / len(ds)
        assert counts.min() > 0.2 and counts.max() < 0.3
    # Both hard constructions occur often.
    negated = sum(any(f" {w} " in t for w in NEGATORS) for t in a.train.text_a) / 2000
    contrast = sum(" but " in t for t in a.train.text_a) / 2000
    assert 0.15 < negated < 0.32 and 0.15 < contrast < 0.25  # about 0.23 and 0.20 by construction


def test_synthetic_labels_follow_the_rule_with_train_noise_only():
    task = load_task("synthetic", None, seed=0)
    assert all(synthetic_rule_label(t) == y for t, y in zip(task.eval.text_a, task.eval.labels))
    wrong = np.mean([synthetic_rule_label(t) != y for t, y in zip(task.train.text_a, task.train.labels)])
    assert 0.015 < wrong < 0.05


def test_synthetic_rule_negation_and_but():
    assert synthetic_rule_label("the soup was great .") == 1
    assert synthetic_rule_label("the soup was not great .") == 0
    assert synthetic_rule_label("the match was never awful .") == 3
    assert synthetic_rule_label("the match was hardly awful .") == 3
    assert synthetic_rule_label("the match was awful .") == 2
    assert synthetic_rule_label("the soup was awful but the cake was great .") == 1
    assert synthetic_rule_label("the soup was great but the cake was not great .") == 0
    assert synthetic_rule_label("honestly, the coach was great but the team is dull again .") == 2


def test_synthetic_generator_negation_flips_the_label():
    # Removing the negator from a generated single-clause sentence flips sentiment, not topic.
    texts, labels = make_synthetic(400, seed=7)
    checked = 0
    for text, label in zip(texts, labels):
        words = text.split()
        if "but" in words or not set(words) & set(NEGATORS):
            continue
        plain = " ".join(w for w in words if w not in NEGATORS)
        assert synthetic_rule_label(plain) == label ^ 1
        checked += 1
    assert checked > 50


def test_synthetic_causal_lm():
    lm = load_task("synthetic", None, task_kind="causal-lm", synthetic_train=20, synthetic_eval=5)
    cls = load_task("synthetic", None, synthetic_train=20, synthetic_eval=5)
    assert lm.kind == "causal-lm" and lm.num_labels == 0 and lm.metric_names == []
    assert lm.train.labels is None and lm.train.text_b is None
    assert lm.train.text_a == cls.train.text_a
    assert len(lm.eval) == 5
