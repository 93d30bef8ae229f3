"""Shared fixtures: tiny configs that train in seconds on CPU, and small data folders in the
layouts of the real GLUE and E2E files (written into a test's tmp_path; no data folder needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from colora.config import build_config

# Tiny models: thread start-up costs more than it saves, and CI has 2 cores.
torch.set_num_threads(1)


def tiny_raw(**over) -> dict:
    """A raw config for tiny-bert on a small synthetic task; ``over`` takes dotted keys."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "algorithm": "fedavg",
        "rounds": 3,
        "model": {"name": "tiny-bert"},
        "data": {"name": "synthetic", "synthetic_train": 240, "synthetic_eval": 64, "max_length": 48},
        "clients": {"num": 3, "per_round": 3},
        "train": {"local_steps": 2, "batch_size": 8, "lr": 5.0e-3, "eval_batch_size": 32},
        "log": {"progress": False},
    }
    return raw, over


def tiny_config(**over):
    raw, over = tiny_raw(**over)
    return build_config(raw, {k.replace("__", "."): v for k, v in over.items()})


def cli_error(tmp_path: Path, capsys, raw: dict, sets: list[str]) -> str:
    """Run ``colora run`` on config ``raw`` with ``--set`` overrides; assert it exits 2 with one line
    on stderr (no traceback) and return that line."""
    import yaml

    from colora.cli import main

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    argv = ["run", str(path), "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("colora: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def round_one_killing_a_worker(cls, ref, eng, kill) -> None:
    """Round 1 on ``ref`` and on ``eng``, killing one of ``eng``'s workers (``kill()``) right after
    ``cls.handle`` (a split server part) first answers: that worker then waits for this reply."""
    handle, calls = cls.handle, []

    def kill_after_first_answer(server, blob):
        out = handle(server, blob)
        calls.append(1)
        if len(calls) == 1:
            kill()
        return out
    ref.algorithm.run_round(1)
    cls.handle = kill_after_first_answer
    try:
        eng.algorithm.run_round(1)
    finally:
        cls.handle = handle


def spy_rounds(cfg, rounds: int):
    """Run ``rounds`` rounds of ``cfg`` on its engine, keeping every round's tasks, (copied) results
    and the global state before and after each round; returns (seen, globals, metrics, algorithm)."""
    from colora.engines import Engine
    from colora.types import ClientResult

    seen = []
    with Engine(cfg) as engine:
        algo, run_tasks = engine.algorithm, engine.algorithm.ctx.run_tasks

        def spy(tasks):
            results = run_tasks(tasks)
            seen.append((tasks, [ClientResult(r.client_id, dict(r.state), r.num_samples, r.loss, r.flops, r.steps,
                                              scores=r.scores) for r in results]))
            return results
        algo.ctx.run_tasks = spy
        globals_, metrics = [dict(algo.global_state())], []
        for rnd in range(1, rounds + 1):
            metrics.append(algo.run_round(rnd))
            globals_.append(dict(algo.global_state()))
    return seen, globals_, metrics, algo


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# GLUE folders in the original release's TSV layout (sentences are synthetic). What each file
# looks like, as in the GLUE release:
# - MRPC: a UTF-8 byte-order mark, then the header `Quality  #1 ID  #2 ID  #1 String  #2 String`;
#   label first, two numeric ids, then the two sentences; tokenized text with quote characters
#   that are not CSV quoting (a `"` opening a field and never closed).
# - SST-2: header `sentence  label`; each sentence ends with a space before the tab.
# - CoLA: no header; columns source, label, original mark (`*`, `?*`, `??` or empty), sentence;
#   dev.tsv has no final newline.
# - STS-B: header with ten columns (index .. sentence1, sentence2, score); scores written as
#   `5.000`, `3.800`, `4.00`, `0.8` or `0`; a sentence may open with an unclosed `"`.
# Rows are (label, sentence) for SST-2 and CoLA, (label, sentence 1, sentence 2) for MRPC and
# (score as written, sentence 1, sentence 2) for STS-B.
# ---------------------------------------------------------------------------------------------

GLUE_ROWS: dict[str, dict[str, list[tuple]]] = {
    "MRPC": {
        "train": [
            (1, 'Nora told the council , whom she called " the old guard " , that the bridge budget was too small .',
             'Calling them only " the old guard " , Nora told the council the bridge budget was too small .'),
            (0, "Brightwell 's sold the bakery chain to Oakmont in 2001 for $ 3.1 million .",
             "Brightwell 's bought the chain in 1997 for $ 950,000 and sold it to Oakmont for $ 2.2 million in 2001 ."),
            (1, "The ferry left the harbour at 6 a.m. , two hours behind schedule .",
             '" The ferry left the harbour two hours late , at 6 a.m. , the operator said .'),
            (1, "Shares of Lanwick rose 4 percent on Tuesday after the merger news .",
             "Lanwick shares gained 4 percent Tuesday following news of the merger ."),
            (0, "The museum will close for repairs in March , the mayor 's office said .",
             "The mayor 's office said the museum would open a new wing in March ."),
            (1, "Officials said the storm knocked out power to 12,000 homes overnight .",
             "About 12,000 homes lost power overnight because of the storm , officials said ."),
        ],
        "dev": [
            (1, "He said the paper mill does n't fit the group 's long-term plans .",
             '" The paper mill does not fit our long-term plans .'),
            (0, "The index closed at 1,204.5 points , up 0.3 percent on the day .",
             'Traders called the session " quiet " as volumes fell for a third day .'),
            (1, "Heavy rain flooded the low roads near the river on Sunday .",
             "On Sunday heavy rain flooded roads near the river ."),
        ],
    },
    "SST-2": {
        "train": [
            (0, "stale jokes from a tired old script"),
            (0, "has no spark , only forced cheer"),
            (1, "a warm and quietly funny portrait of a small town"),
            (1, "the cast 's easy charm carries it"),
            (0, "a long , ` clever ' film that never lands"),
            (1, "rich , moving and beautifully shot"),
        ],
        "dev": [
            (1, "it 's a bright and often touching ride ."),
            (0, "dull and needlessly grim"),
            (1, "a film that earns every one of its tears ."),
            (0, "... a limp attempt at suspense by a talented crew ."),
        ],
    },
    "CoLA": {
        "train": [
            (1, "Our neighbours won't paint the fence, let alone the whole shed we built."),
            (0, "The gardener sneezed the roses."),
            (1, "The more we read, the less we understood."),
            (0, "Kim whispered the door."),
            (1, 'Pat shouted "Stop it" at the dog.'),
            (0, "Which book did you wonder whether Lee read?"),
            (1, "What all did you bring to the picnic?"),
        ],
        "dev": [
            (1, "The wind blew the kite clear of the trees."),
            (0, "The baker laughed the bread."),
            (1, "Lee argued with Sam about himself."),
        ],
    },
    "STS-B": {
        "train": [
            ("5.000", "A bird is taking off.", "A small bird is taking off."),
            ("3.800", "A woman is playing a large drum.", "A woman is playing a drum."),
            ("0.8", '"Then the guard was asleep.', "Then the guard woke up."),
            ("4.00", 'A cat in a "hero" costume naps on a sofa.', "A grey cat in a costume is lying on a sofa."),
            ("0", "Markets slip as oil prices climb", "Local team wins the regional final"),
        ],
        "dev": [
            ("5.000", "A boy with a red cap is running.", "A boy wearing a red cap is running."),
            ("4.750", "A young girl is riding a bike.", "A girl is riding a bike."),
            ("1.2", '"Ghosts are not real" - agreed.', '"Dragons are not real" - agreed.'),
            ("0", "City council delays vote on new park", "Storm warning issued for the coast"),
        ],
    },
}

_MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
_STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
_COLA_SOURCES = ("gj04", "bc01", "ad03")
_COLA_MARKS = ("*", "?*", "??")  # the original judgment of an unacceptable sentence


def _glue_lines(folder: str, rows: list[tuple]) -> list[str]:
    if folder == "MRPC":
        return [_MRPC_HEADER] + [f"{label}\t{700001 + 97 * i}\t{700050 + 89 * i}\t{a}\t{b}"
                                 for i, (label, a, b) in enumerate(rows)]
    if folder == "SST-2":
        return ["sentence\tlabel"] + [f"{text} \t{label}" for label, text in rows]
    if folder == "CoLA":
        return [f"{_COLA_SOURCES[i % 3]}\t{label}\t{'' if label else _COLA_MARKS[i % 3]}\t{text}"
                for i, (label, text) in enumerate(rows)]
    if folder == "STS-B":
        return [_STSB_HEADER] + [
            f"{i}\tmain-captions\timages\t2015\t{i + 1:04d}\tnone\tnone\t{a}\t{b}\t{score}"
            for i, (score, a, b) in enumerate(rows)]
    raise ValueError(f"no GLUE layout for {folder!r}; known: {sorted(GLUE_ROWS)}")


def write_glue(root: Path, folder: str, train: list[tuple] | None = None, dev: list[tuple] | None = None) -> Path:
    """Write ``root/folder/{train,dev}.tsv`` in the layout of that GLUE task's original files
    (default rows: ``GLUE_ROWS[folder]``); returns the task folder."""
    task = Path(root) / folder
    task.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("dev", dev)):
        lines = _glue_lines(folder, GLUE_ROWS[folder][split] if rows is None else rows)
        end = "" if (folder, split) == ("CoLA", "dev") else "\n"  # CoLA's dev.tsv has no final newline
        (task / f"{split}.tsv").write_text("\n".join(lines) + end, encoding="utf-8")
    return task


@pytest.fixture
def glue_dir(tmp_path) -> Path:
    """A GLUE root holding MRPC, SST-2, CoLA and STS-B folders with the ``GLUE_ROWS`` rows."""
    root = tmp_path / "glue"
    for folder in GLUE_ROWS:
        write_glue(root, folder)
    return root


# ---------------------------------------------------------------------------------------------
# E2E in the LoRA scripts' layout: `meaning representation||reference text` per line, the text
# tokenized and followed by a space; several references per meaning representation, on
# consecutive lines. Like the copy the project uses, the folder has valid.txt and test.txt but no
# train.txt (so train = valid.txt, eval = test.txt).
# ---------------------------------------------------------------------------------------------

_E2E_NAMES = ("The Copper Kettle", "Bluebell", "The Olive Tree", "Marlow House", "Riverstone", "The Green Lantern",
              "Fennel", "The Old Mill", "Saffron", "Harbour View", "The Red Fox", "Juniper")
_E2E_TYPES = ("coffee shop", "pub", "restaurant")
_E2E_FOODS = ("Italian", "French", "Indian", "English", "Chinese", "Japanese")
_E2E_AREAS = ("city centre", "riverside")


def e2e_lines(n_meanings: int, refs: int = 3, start: int = 0) -> list[str]:
    """``n_meanings`` synthetic meaning representations, ``refs`` references each. As in the real
    files, most meaning representations are short (2 or 3 attributes) and some long (4 or 5), so
    that a short ``data.max_length`` still leaves target tokens after most prompts."""
    lines = []
    for k in range(start, start + n_meanings):
        name, kind = _E2E_NAMES[k % len(_E2E_NAMES)], _E2E_TYPES[k % 3]
        extra = (0, 1, 0, 3, 1, 2)[k % 6]  # attributes beyond name and type
        area = _E2E_AREAS[k % 2] if extra >= 1 else None
        food = _E2E_FOODS[k % len(_E2E_FOODS)] if extra >= 2 else None
        family = (k % 4 < 2) if extra >= 3 else None
        mr = " | ".join([f"name : {name}", f"Type : {kind}"] + [f"area : {area}"] * (area is not None)
                        + [f"food : {food}"] * (food is not None)
                        + [f"family friendly : {'yes' if family else 'no'}"] * (family is not None))
        what = f"{food} {kind}" if food else kind
        where = f" in the {area}" if area else ""
        friendly = "" if family is None else f" It is {'' if family else 'not '}family - friendly ."
        article = "an" if what[0] in "AEIOU" else "a"
        texts = [f"{name} is {article} {what}{where} .{friendly}",
                 f"There is {article} {what} called {name}{where} .{friendly}",
                 f"{name} , {article} {what}{where} , is worth a visit .{friendly}"]
        lines += [f"{mr}||{texts[j % 3]} " for j in range(refs)]
    return lines


def write_e2e(folder: Path, valid: list[str] | None = None, test: list[str] | None = None,
              train: list[str] | None = None) -> Path:
    """Write an E2E folder: valid.txt (default: 36 meanings x 3 references) and test.txt
    (default: 8 other meanings x 3 references), plus train.txt when given; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"valid": e2e_lines(36) if valid is None else valid,
             "test": e2e_lines(8, start=36) if test is None else test, "train": train}
    for split, lines in files.items():
        if lines is not None:
            (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def e2e_dir(tmp_path) -> Path:
    """An E2E folder with valid.txt (108 lines) and test.txt (24 lines), no train.txt."""
    return write_e2e(tmp_path / "e2e")
