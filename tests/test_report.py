"""Reports are well-formed: linked figures exist and are PNGs, tables parse and have equal cell counts,
every figure and table names its command, and re-rendering gives the same bytes."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from diffkit.cli import main
from diffkit.report.markdown import md_context

PNG = b"\x89PNG\r\n\x1a\n"


def check_report(report: Path, command: str) -> str:
    """Assert the invariants every report must hold; return its text."""
    text = report.read_text()
    root = report.parent
    assert text.startswith(f"<!-- Written by `{command}`")
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", text)
    assert len(figures) >= 4
    for fig in figures:
        data = (root / fig).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, fig
        assert f"Figure `{fig}`" in text and b"Software" not in data
    tables = re.findall(r"Table `(tables/[^`]+\.csv)` · regenerate: `([^`]+)`", text)
    assert len(tables) >= 8 and {c for _, c in tables} == {command}
    assert {t for t, _ in tables} == {f"tables/{p.name}" for p in (root / "tables").glob("*.csv")}
    for table, _ in tables:
        df = pd.read_csv(root / table)
        assert len(df) >= 1 and len(df.columns) >= 2, table
    # Every markdown table: each row as many cells as its header (escaped pipes inside cells do not count).
    blocks = re.findall(r"(\|.*\|\n\|[-|]+\|\n(?:\|.*\|\n)+)", text)
    assert len(blocks) == len(tables)
    for block in blocks:
        counts = {line.replace("\\|", "").count("|") for line in block.strip().splitlines()}
        assert len(counts) == 1, block
    assert "## Definitions" in text and text.count("**FVE**") == 1 and "12·N_train·L·D" in text.replace("\\", "")
    return text


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from test_compare import planted_case

    root = tmp_path_factory.mktemp("report")
    planted_case(root)
    result = CliRunner().invoke(main, ["compare", "--align", str(root / "align"), "--crosscoder", str(root / "cc-built"),
                                       "--acts", str(root / "store"), "--out", str(root / "cmp"), "--quiet"])
    assert result.exit_code == 0, result.output
    return root


def test_compare_writes_a_well_formed_report(compared):
    out = compared / "cmp"
    command = (f"diffkit compare --align {compared / 'align'} --crosscoder {compared / 'cc-built'} --acts "
               f"{compared / 'store'} --out {out} --quiet")
    text = check_report(out / "report.md", command)
    row = next(line for line in text.splitlines() if line.startswith("| planted:a vs planted:b | planted:a"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "128 / 16 / 48" and cells[3] == "16 / 48 (192)" and cells[5] != "n/a / n/a"


def test_report_command_rerenders_identically_with_a_control(compared, tmp_path):
    runner = CliRunner()
    out = tmp_path / "report"
    args = ["report", "--compare", str(compared / "cmp"), "--control", str(compared / "cmp"), "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    text = check_report(out / "report.md", " ".join(["diffkit", *args]))
    headline = text[text.index("## Head to head"):text.index("## What was compared")]
    assert headline.count("| planted:a vs planted:b | planted:a vs planted:b |") == 2  # main and control rows
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "tables" / "stale.csv").write_text("a,b\n1,2\n")
    assert runner.invoke(main, args).exit_code == 0
    again = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert again == first  # same bytes, figures included (no date or software metadata); stale tables removed
    result = runner.invoke(main, ["report", "--compare", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "is not a complete comparison" in result.output


def test_markdown_contexts_escape_and_mark_the_token():
    assert md_context("a|b [[*]] c") == "a\\|b\u00a0**\\***\u00a0c"
    assert md_context("x[[ ]]y") == "x**␣**y"
    assert md_context("x«z»_") == "x**z**\\_"
    assert md_context("no mark_") == "no\u00a0mark\\_"
