"""``diffkit demo`` in a reduced mode (3,000 tokens per store, tiny crosscoders): every stage runs and
the report is well-formed, leads with the organism's answer key, with the controls where they belong."""

import json
import re

from test_report import check_report

from diffkit.activations import ActivationStore
from diffkit.demo import DemoConfig, run_demo
from diffkit.diff import load_table


def test_demo_runs_end_to_end_in_reduced_mode(tmp_path):
    cfg = DemoConfig(tokens=3000, cc_tokens=4096, cc_dict_size=256, cc_batch_size=512)
    lines = []
    report = run_demo(tmp_path / "report", tmp_path / "work", cfg, log=lines.append)
    stages = ["losses", "collect", "saes", "map", "align", "crosscoder", "compare", "answer", "report"]  # the pipeline's
    assert [line for line in lines if line.startswith("[")] == [f"[{i}/9] {s}" for i, s in enumerate(stages, 1)]
    text = check_report(report, "diffkit demo")
    assert "| diff | `zoo:base` | `zoo:backdoor` | 3,000 |" in text
    # The organism's answer key leads the report: each method's rank of B's first planted feature.
    lead = text[:text.index("Two ways to find")]
    assert "`organism:backdoor` marks the tokens" in lead and "| map-error |" in lead
    assert "B learned it: after the trigger" in lead  # the organism's behaviour, measured for both models
    assert (report.parent / "tables" / "answer_key.csv").exists()
    assert "| same | `zoo:base` | `zoo:base` | 3,000 |" in text
    assert "| sae-seed control | base vs base, SAE seed 0 vs 1 |" in text  # zoo:base@seed1/blocks.1 is seed 1
    assert re.search(r"\bnan\b", text, flags=re.I) is None  # missing numbers read n/a
    head = text[text.index("## Head to head"):text.index("## What was compared")]
    assert "align at FDR 10%: A-only / B-only / changed" in head and "crosscoder at FDR 10%" in head
    assert [line.split("|")[1].strip() for line in head.splitlines() if line.startswith("| ") and "---" not in line][1:] \
        == ["diff", "sae-seed control", "model-seed pair"]
    # The SAE-seed control runs on the identical-model store: its map is exact, and the report reads the
    # diff against it.
    row = next(line for line in text.splitlines() if line.startswith("| sae-seed control | 1.000 | 1.000 |"))
    assert row and "**Noise floor of the training-free diff.**" in text
    work = tmp_path / "work"
    for label in ("diff", "same", "seed"):
        assert ActivationStore.open(work / f"store-{label}", verify="full").n_tokens("all") == 3000
        assert (work / f"crosscoder-{label}" / "crosscoder.safetensors").exists()
    for run in ("diff", "sae-seed", "model-seed"):
        table = load_table(work / f"align-{run}")
        assert set(table.kind) == {"shared", "a_only", "b_only"} and len(table[table.kind != "b_only"]) == 1024
        summary = json.loads((work / f"compare-{run}" / "comparison.json").read_text())
        assert summary["cost"]["stages"]["map_fit"]["seconds"] > 0  # the demo saves the map beside the diff
        assert summary["crosscoder"]["dict_size"] == 256
    assert json.loads((work / "demo_config.json").read_text())["cc_tokens"] == 4096
    assert "### Top A-only features" in text and "**" in text  # contexts with the token marked
