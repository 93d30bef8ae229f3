import collections
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from colora.data import DataError, load_task, make_synthetic, synthetic_rule_label
from colora.data.synthetic import NEGATORS

from .conftest import GLUE_ROWS, e2e_lines, write_e2e, write_glue


def data_lines(path: Path) -> list[str]:
    """Non-empty lines, read independently of the loaders (plain split, no csv module)."""
    return [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]


def labels_of(folder: str, split: str) -> list:
    return [row[0] for row in GLUE_ROWS[folder][split]]


# Row counts of the GLUE files written by conftest's write_glue, counted as non-empty lines minus
# the header (CoLA has none; its dev.tsv lacks a final newline, as in the GLUE release). Every row
# has the right number of columns, so no row is skipped.
@pytest.mark.parametrize(
    "name, folder, header",
    [
        ("glue/mrpc", "MRPC", True),
        ("glue/sst-2", "SST-2", True),
        ("glue/cola", "CoLA", False),
        ("glue/sts-b", "STS-B", True),
    ],
)
def test_glue_row_counts_match_the_files(glue_dir, name, folder, header):
    task = load_task(name, str(glue_dir / folder))
    assert len(task.train) == len(GLUE_ROWS[folder]["train"]) == len(data_lines(glue_dir / folder / "train.tsv")) - header
    assert len(task.eval) == len(GLUE_ROWS[folder]["dev"]) == len(data_lines(glue_dir / folder / "dev.tsv")) - header
    assert task.kind == "seq-cls"


def test_mrpc(glue_dir):
    assert (glue_dir / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID\t")
    task = load_task("glue/mrpc", str(glue_dir / "MRPC"))
    assert task.name == "glue/mrpc"
    assert task.num_labels == 2
    assert task.label_names == ["not_equivalent", "equivalent"]
    assert task.metric_names == ["accuracy", "f1"]
    # The header's byte-order mark must not end up in a column name or the first example.
    assert task.train.text_a[0] == (
        'Nora told the council , whom she called " the old guard " , that the bridge budget was too small .'
    )
    assert task.train.text_b[0] == (
        'Calling them only " the old guard " , Nora told the council the bridge budget was too small .'
    )
    # A field that opens with an unclosed quote is text, not CSV quoting: it must not swallow the
    # following rows.
    assert task.train.text_b[2] == '" The ferry left the harbour two hours late , at 6 a.m. , the operator said .'
    assert task.eval.text_b[0] == '" The paper mill does not fit our long-term plans .'
    assert task.train.labels[:2] == [1, 0]
    assert collections.Counter(task.train.labels) == {1: 4, 0: 2}
    independent = collections.Counter(int(line.split("\t")[0]) for line in data_lines(glue_dir / "MRPC" / "train.tsv")[1:])
    assert collections.Counter(task.train.labels) == independent
    assert collections.Counter(task.eval.labels) == {1: 2, 0: 1}
    assert task.train.labels == labels_of("MRPC", "train") and task.eval.labels == labels_of("MRPC", "dev")


def test_sst2(glue_dir):
    task = load_task("glue/sst2", str(glue_dir / "SST-2"))
    assert task.name == "glue/sst2"
    assert task.label_names == ["negative", "positive"]
    assert task.metric_names == ["accuracy"]
    assert task.train.text_b is None
    # The space before each tab is stripped.
    assert task.train.text_a[0] == "stale jokes from a tired old script"
    assert task.eval.text_a[0] == "it 's a bright and often touching ride ."
    assert task.train.text_a[4] == "a long , ` clever ' film that never lands"
    assert collections.Counter(task.train.labels) == {1: 3, 0: 3}
    assert collections.Counter(task.eval.labels) == {1: 2, 0: 2}
    assert task.train.labels == labels_of("SST-2", "train")


def test_cola_has_no_header(glue_dir):
    assert not (glue_dir / "CoLA" / "dev.tsv").read_text().endswith("\n")
    task = load_task("glue/cola", str(glue_dir / "CoLA"))
    assert task.label_names == ["unacceptable", "acceptable"]
    assert task.metric_names == ["mcc"]
    # The first line is an example, not a header.
    assert task.train.text_a[0] == "Our neighbours won't paint the fence, let alone the whole shed we built."
    assert task.train.text_a[4] == 'Pat shouted "Stop it" at the dog.'
    # The last line of dev.tsv (no final newline) is read.
    assert task.eval.text_a[-1] == "Lee argued with Sam about himself."
    assert collections.Counter(task.train.labels) == {1: 4, 0: 3}
    assert collections.Counter(task.eval.labels) == {1: 2, 0: 1}
    assert task.train.labels == labels_of("CoLA", "train")


def test_stsb_is_regression(glue_dir):
    task = load_task("glue/sts-b", str(glue_dir / "STS-B"))
    assert task.name == "glue/stsb"
    assert task.num_labels == 1 and task.is_regression
    assert task.metric_names == ["pearson", "spearman"]
    assert (task.train.text_a[0], task.train.text_b[0], task.train.labels[0]) == (
        "A bird is taking off.", "A small bird is taking off.", 5.0,
    )
    assert task.train.text_a[2] == '"Then the guard was asleep.'
    assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for y in task.train.labels)
    assert task.train.labels == [5.0, 3.8, 0.8, 4.0, 0.0]
    independent = [float(line.split("\t")[-1]) for line in data_lines(glue_dir / "STS-B" / "dev.tsv")[1:]]
    assert task.eval.labels == pytest.approx(independent)


def test_glue_root_folder_is_accepted(glue_dir):
    task = load_task("glue/mrpc", str(glue_dir))
    assert len(task.train) == len(GLUE_ROWS["MRPC"]["train"])
    assert load_task("glue/cola", str(glue_dir)).eval.text_a == [row[1] for row in GLUE_ROWS["CoLA"]["dev"]]


def test_write_glue_takes_custom_rows(tmp_path):
    folder = write_glue(tmp_path, "SST-2", train=[(1, "fine"), (0, "poor"), (1, "good")], dev=[(0, "bad")])
    task = load_task("glue/sst2", str(folder))
    assert (len(task.train), len(task.eval)) == (3, 1) and task.train.labels == [1, 0, 1] and task.eval.labels == [0]


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
    with pytest.raises(DataError, match=r"dev\.tsv, line 2: the label is not one of") as info:
        load_task("glue/sst2", str(tmp_path))
    assert "maybe" not in str(info.value)  # an error about a file never quotes its content
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


def test_e2e_folder_without_train_file(e2e_dir):
    assert sorted(p.name for p in e2e_dir.iterdir()) == ["test.txt", "valid.txt"]
    task = load_task("e2e", str(e2e_dir))
    assert task.kind == "causal-lm" and task.num_labels == 0 and task.metric_names == []
    # No train.txt: train = valid.txt, eval = test.txt.
    assert len(task.train) == len(data_lines(e2e_dir / "valid.txt")) == 108
    assert len(task.eval) == len(data_lines(e2e_dir / "test.txt")) == 24
    assert task.train.labels is None and task.eval.labels is None
    # The meaning representation and the text are split at "||" and the trailing space is stripped.
    assert (e2e_dir / "valid.txt").read_text().split("\n")[0].endswith(" . ")
    first = "name : The Copper Kettle | Type : coffee shop"
    assert task.train.text_a[:3] == [first] * 3
    assert task.train.text_b[:3] == ["The Copper Kettle is a coffee shop .", "There is a coffee shop called The Copper Kettle .",
                                     "The Copper Kettle , a coffee shop , is worth a visit ."]
    assert task.train.text_b[9] == "Marlow House is an English coffee shop in the riverside . It is not family - friendly ."
    assert task.eval.text_a[0] == e2e_lines(1, start=36)[0].split("||")[0]
    with_train = write_e2e(e2e_dir.parent / "with_train", train=e2e_lines(2))
    assert len(load_task("e2e", str(with_train)).train) == 6


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
    with pytest.raises(DataError, match=r"dev\.jsonl, line 1: the label does not occur in the train file"):
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
    with pytest.raises(DataError, match=r"dev\.csv, line 2: class id 4 does not occur in the train file"):
        load_task("csv", str(tmp_path), text_column="sentence", label_column="extra")  # it would add a class
    write(tmp_path / "dev.csv", ["sentence,label,extra", "x,ham,2"])
    ints = load_task("csv", str(tmp_path), text_column="sentence", label_column="extra")
    assert ints.train.labels == [1, 2, 3] and ints.eval.labels == [2] and ints.num_labels == 4
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
