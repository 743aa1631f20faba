"""``diffkit report``: a comparison (or several) as ``report.md`` + ``figures/*.png`` + ``tables/*.csv``.

Reads only artifacts: each run is a ``diffkit compare`` output directory (``comparison.json``,
``bridge.parquet``, ``crosscoder-analysis/``) plus the FeatureDiff it names. The first run is the
main comparison; the others are controls shown beside it (``role`` ``sae-seed``: the same model
with two SAE seeds, the noise floor; ``model-seed``: another model trained the same way). Every
table is also written as CSV, every figure and table names the command that regenerates it, and
every metric's formula is stated once, in the report's last section. Figures: :mod:`.figures`;
sections: :mod:`.sections`; markdown and CSV: :mod:`.markdown`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import DiffkitError
from .markdown import Tables, escape, md_context

__all__ = ["RunData", "load_run", "start_report", "write_report", "md_context", "escape"]
ROLES = ("main", "sae-seed", "model-seed", "control")


@dataclass
class RunData:
    """One comparison and the artifacts it was made from."""

    label: str
    what: str
    role: str
    summary: dict
    bridge: Any
    curves: Any
    latents: Any
    align_table: Any
    align_summary: dict
    align_contexts: dict   # ("a"|"b", feature) -> list of marked contexts
    cc_top: dict           # "A-only"/"B-only" -> the analysis's top latents with contexts


def load_run(compare_dir: str | Path, label: str | None = None, what: str | None = None,
             role: str = "main") -> RunData:
    """Load a ``diffkit compare`` output directory and the FeatureDiff it was made from."""
    from ..compare import ANALYSIS_DIR, load_comparison
    from baselines.crosscoder.analysis import load_analysis_summary, load_latents

    from ..diff import load_diff_json, load_table

    if role not in ROLES:
        raise DiffkitError(f"unknown run role {role!r}: use one of {', '.join(ROLES)}")
    compare_dir = Path(compare_dir)
    comp = load_comparison(compare_dir)
    s = comp.summary
    analysis = compare_dir / ANALYSIS_DIR
    align_dir = Path(s["inputs"]["align"])
    if not (align_dir / "summary.json").exists():
        raise DiffkitError(f"the FeatureDiff {align_dir} named by {compare_dir / 'comparison.json'} is gone: run "
                           "`diffkit align` and `diffkit compare` again")
    contexts = {(c["side"], int(c["feature"])): c["contexts"] for c in load_diff_json(align_dir, "contexts.json")}
    st = s["store"]
    return RunData(label=label or f"{st['model_a']} vs {st['model_b']}",
                   what=what or f"{st['model_a']} vs {st['model_b']}", role=role, summary=s, bridge=comp.bridge,
                   curves=comp.curves, latents=load_latents(analysis),
                   align_table=load_table(align_dir), align_summary=load_diff_json(align_dir, "summary.json"),
                   align_contexts=contexts, cc_top=load_analysis_summary(analysis).get("top", {}))


def _figure(name: str, alt: str, caption: str, command: str) -> list[str]:
    return [f"![{alt}](figures/{name})", "", f"<sub>Figure `figures/{name}`: {caption} · regenerate: `{command}`</sub>",
            ""]


def start_report(out: str | Path, command: str) -> Tables:
    """Remove the figures and tables of an earlier report in ``out``; return the table writer for a new one."""
    out = Path(out)
    for sub, pattern in (("figures", "*.png"), ("tables", "*.csv")):
        for stale in sorted((out / sub).glob(pattern)):
            stale.unlink()
    return Tables(out, command)


def write_report(out: str | Path, runs: Sequence[RunData], command: str, title: str = "diffkit: head to head",
                 preamble: Sequence[str] = (), footer: Sequence[str] = (), tables: Tables | None = None,
                 finding: Sequence[str] = ()) -> Path:
    """Write ``out/report.md``, ``out/figures/*.png`` and ``out/tables/*.csv`` for ``runs`` (main first).

    ``command`` is the command that regenerates the report (named under every figure and table);
    ``finding`` markdown lines go first, under the title (a found answer leads the report);
    ``preamble`` markdown lines go after the introduction; ``tables`` is the writer they used (from
    :func:`start_report`), if any; without it stale figures and tables in ``out`` are removed first.
    """
    from ..io import atomic_write_bytes
    from . import figures, sections

    if not runs:
        raise DiffkitError("a report needs at least one comparison: pass --compare DIR")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = tables or start_report(out, command)
    main = runs[0]
    figs = out / "figures"
    figures.alignment(runs, figs / "alignment.png", command)
    figures.relative_norms(runs, figs / "relative_norms.png", command)
    figures.scatter(main, figs / "scatter.png", command)
    figures.precision_at_k(runs, figs / "precision_at_k.png", command)
    head, _ = sections.headline(runs, tables)
    s = main.summary
    lines = [f"<!-- Written by `{command}`. Regenerate with: {command} -->", f"# {title}", "", *finding,
             f"Two ways to find the features two models share and the ones only one has, run on the same activations "
             f"and compared: the **training-free diff** (`diffkit align`: a least-squares map between the activation "
             f"spaces, the models' own SAEs matched one-to-one through it) and the **crosscoder** baseline (one sparse "
             f"dictionary trained on both models). Main comparison: **{escape(main.label)}** "
             f"(`{s['store']['model_a']}` vs `{s['store']['model_b']}`)"
             + (f"; controls: {', '.join(escape(r.label) for r in runs[1:])}." if len(runs) > 1 else "."),
             "", *preamble, "## Head to head", "", *head,
             "## What was compared", "", *sections.compared(runs, tables),
             "## Training-free diff: map and alignment quality", "",
             "Held-out FVE of the affine maps; counts of SAE feature pairs at the similarity threshold.", "",
             *sections.alignment(runs, tables),
             *_figure("alignment.png", "similarity histograms", "left, similarity of every assigned SAE pair (the "
                      "dotted line is the threshold); right, cosine of each SAE feature with the crosscoder latent the "
                      "bridge assigned it", command),
             "## Top differing features (training-free diff)", "",
             "The token each feature fires on is in bold (a space is ␣, ⏎ a newline); contexts are the feature's "
             "top-activating tokens in the store. *crosscoder latent (r)*: the latent bridged to the feature and its "
             "relative norm.", "", *sections.top_features(main, tables),
             "## Crosscoder", "", *sections.crosscoder(runs, tables), *sections.crosscoder_top(main, tables),
             *_figure("relative_norms.png", "relative norm histogram", "relative decoder norm of the live latents "
                      "(log count)", command),
             "## Agreement", "",
             "Each crosscoder latent is matched one-to-one to each SAE's features by decoder cosine in that model's "
             "space (the *bridge*); the two methods' verdicts are then compared on the same SAE features.", "",
             *sections.agreement(runs, tables),
             *_figure("scatter.png", "score scatter", "each method's exclusivity score of the same SAE features, and "
                      "the strength difference of shared pairs", command),
             *_figure("precision_at_k.png", "precision at k", "overlap of the k most exclusive features by each "
                      "method (dotted grey: chance)", command),
             f"### Disagreements ({escape(main.label)})", "", *sections.disagreements(main, tables),
             "## Reconstruction (held-out FVE)", "",
             "What each method's parts explain of the activations: the SAEs and the maps (training-free diff), the "
             "crosscoder (both models at once).", "", *sections.reconstruction(runs, tables),
             "## Cost", "", "End to end from the same activation store.", "", *sections.cost(runs, tables),
             "## Caveats", "", *sections.caveats(list(runs)),
             "## Definitions", "", *sections.definitions(list(runs)), *footer]
    report = out / "report.md"
    atomic_write_bytes(report, ("\n".join(lines).rstrip() + "\n").encode())
    return report
