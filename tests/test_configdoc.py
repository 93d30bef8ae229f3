"""docs/config.md is generated from colora/config.py and documents every key."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from colora.config import Config
from colora.configdoc import COMMAND, render
from colora.rundir import RESUMABLE_KEYS

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _row(text: str, key: str) -> list[str]:
    """The cells of the table row for dotted ``key``."""
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| `{key}` |")]
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render(), f"docs/config.md is out of date; regenerate it with `{COMMAND}`"


def test_every_key_has_a_description():
    def missing(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            if not (field.description or "").strip():
                out.append(key)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out += missing(field.annotation, f"{key}.")
        return out

    assert missing(Config, "") == [], "add an attribute docstring below each of these fields in colora/config.py"


def test_rendered_rows():
    text = render()
    assert _row(text, "train.lr")[1:4] == ["float", "`0.0005`", "> 0"]
    assert _row(text, "algorithm")[1] == r"one of central \| fedavg \| sl \| splitlora \| declora"
    assert _row(text, "model.lora.dropout")[1:4] == ["float", "`0.0`", ">= 0, < 1"]
    assert _row(text, "name")[1:4] == [r"str \| null", "`null`", "max length 200"]
    assert _row(text, "federation.rank_set")[1:3] == ["list[int]", "`[2, 4, 8]`"]
    assert _row(text, "system.client.flops")[2] == "`1.0e+12`"
    assert _row(text, "gossip.quantize_bits")[1] == r"one of 0 \| 4 \| 8"
    for title in ("## model.lora", "## system.heterogeneity", "## eval"):
        assert f"\n{title}\n" in text
    assert COMMAND in text and all(f"`{key}`" in text for key in RESUMABLE_KEYS)
