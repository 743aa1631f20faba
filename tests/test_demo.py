import re

from diffkit.activations import ActivationStore
from diffkit.demo import run_demo


def test_demo_runs_end_to_end_in_reduced_mode(tmp_path):
    report = run_demo(tmp_path / "report", tmp_path / "work", tokens=1500, log=lambda _: None)
    text = report.read_text()
    assert text.startswith("<!-- Written by `diffkit demo`")
    assert "| diff | `zoo:base` | `zoo:finetuned` | 1,500 |" in text
    assert "| control | `zoo:base` | `zoo:base-seed1` | 1,500 |" in text
    assert "nan" not in text.lower().replace("finetuned", "")
    # Every table row has as many cells as its header.
    for table in re.findall(r"(\|.*\|\n\|[-|]+\|\n(?:\|.*\|\n)+)", text):
        lines = table.strip().splitlines()
        assert len({line.count("|") for line in lines}) == 1, table
    for label in ("diff", "control"):
        assert ActivationStore.open(tmp_path / "work" / f"store-{label}", verify="full").n_tokens("all") == 1500
