"""The E2E NLG data-to-text task (causal-lm): meaning representation -> restaurant description.

Local folder format: one example per line, `meaning representation||reference text`, in files
`train.txt`, `valid.txt`, `test.txt` (the layout used by the LoRA paper's E2E scripts). Lines
without `||` are skipped. Which files are used:

- if `train.txt` exists: train = train.txt, eval = valid.txt if it exists, else test.txt;
- otherwise: train = valid.txt, eval = test.txt (for folders that ship only the small splits).

With `path=None` the hub dataset `e2e_nlg` is used (train / validation splits).
"""

from __future__ import annotations

from pathlib import Path

from colora.data.errors import DataError
from colora.data.types import Task, TextDataset, read_data_text


def load_e2e(path: str | None) -> Task:
    """Load E2E from a local folder, or from the Hugging Face hub when `path` is None."""
    if path is None:
        train, eval_ = _load_hub()
    else:
        train_file, eval_file = _pick_files(Path(path).expanduser())
        train, eval_ = _read_lines(train_file), _read_lines(eval_file)
    return Task(
        name="e2e",
        kind="causal-lm",
        num_labels=0,
        label_names=[],
        train=train,
        eval=eval_,
        metric_names=[],
    )


def _pick_files(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise DataError(f"data.path={str(folder)!r}: no such folder")
    train, valid, test = (folder / f"{s}.txt" for s in ("train", "valid", "test"))
    if train.is_file():
        eval_ = valid if valid.is_file() else test
    else:
        train, eval_ = valid, test
    for f in (train, eval_):
        if not f.is_file():
            raise DataError(
                f"{f}: no such file (an E2E folder needs train.txt or valid.txt, plus valid.txt or test.txt)"
            )
    return train, eval_


def _read_lines(path: Path) -> TextDataset:
    meanings: list[str] = []
    texts: list[str] = []
    for line in read_data_text(path).splitlines():
        if "||" not in line:
            continue
        meaning, text = line.split("||", 1)
        meanings.append(meaning.strip())
        texts.append(text.strip())
    if not meanings:
        raise DataError(f"{path}: no 'meaning||text' lines")
    return TextDataset(meanings, texts, None)


def _load_hub() -> tuple[TextDataset, TextDataset]:
    import datasets

    try:
        ds = datasets.load_dataset("e2e_nlg")
    except Exception as e:  # noqa: BLE001 - any hub/network failure means the same to the user
        raise DataError(
            f"data.name=e2e: could not load from the Hugging Face hub (unreachable or offline: "
            f"{type(e).__name__}); set data.path to a folder with valid.txt/test.txt"
        ) from None

    def split(name: str) -> TextDataset:
        return TextDataset(list(ds[name]["meaning_representation"]), list(ds[name]["human_reference"]), None)

    return split("train"), split("validation")
