import re

from diffkit.activations import ActivationStore
from diffkit.demo import _md, run_demo
from diffkit.diff import load_table


def test_demo_runs_end_to_end_in_reduced_mode(tmp_path):
    report = run_demo(tmp_path / "report", tmp_path / "work", tokens=3000, log=lambda _: None)
    text = report.read_text()
    assert text.startswith("<!-- Written by `diffkit demo`")
    assert "| diff | `zoo:base` | `zoo:finetuned` | 3,000 |" in text
    assert "| same | `zoo:base` | `zoo:base` | 3,000 |" in text
    assert "nan" not in text.lower().replace("finetuned", "")
    # Every table row has as many cells as its header (escaped pipes in contexts do not count).
    for table in re.findall(r"(\|.*\|\n\|[-|]+\|\n(?:\|.*\|\n)+)", text):
        lines = table.strip().splitlines()
        assert len({line.replace("\\|", "").count("|") for line in lines}) == 1, table
    for label in ("diff", "same", "seed"):
        assert ActivationStore.open(tmp_path / "work" / f"store-{label}", verify="full").n_tokens("all") == 3000
    # The diff rows: the SAE-seed control runs on the identical-model store, so its map is exact.
    row = next(line for line in text.splitlines() if line.startswith("| sae-seed control |"))
    assert row.split("|")[3].strip().startswith("1.000 / 1.000")
    for run in ("diff", "sae-seed", "model-seed"):
        table = load_table(tmp_path / "work" / f"align-{run}")
        assert set(table.kind) == {"shared", "a_only", "b_only"} and len(table[table.kind != "b_only"]) == 1024
    assert "### Top A-only features of the diff" in text and "**" in text  # contexts with the token marked


def test_markdown_contexts_escape_and_mark_the_token():
    assert _md("a|b [[*]] c") == "a\\|b\u00a0**\\***\u00a0c"
    assert _md("x[[ ]]y") == "x**␣**y"
    assert _md("no mark_") == "no\u00a0mark\\_"
