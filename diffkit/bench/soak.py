"""Soak run: the real CLI stages killed at random points, resumed, and compared with an uninterrupted run.

For each stage (``collect``, ``align``, ``crosscoder train``) on the zoo pair (``zoo:base`` vs
``zoo:finetuned``), the reference artifact is first produced by one uninterrupted subprocess.
Then, cycle after cycle, the same command runs in a fresh directory and is SIGKILLed at a random
time (seeded RNG; with probability ``late_kill`` uniform between the moment the reference run's output
folder appeared and its end, else over the whole run); the command is repeated -- with
``--resume`` for collect and crosscoder train, plainly for align, which has no resume and must
write atomically -- and each repeat may itself be killed, until one completes. Checked:

- after every kill, the half-done output never passes for a complete artifact: it either fails to
  load with a :class:`DiffkitError` or loads equal to the reference ("torn" otherwise);
- the finished artifact equals the reference: every data file of the store by sha256 and its
  manifest; the align table (parquet contents), CSV, contexts and map tensors; the crosscoder's
  weights bitwise (CPU, same threads) and its JSON files. JSON is compared with timing fields
  (keys naming seconds / elapsed / rates) dropped and the run directory's path replaced;
- no temporary file (``*.tmp``, ``*.partial``, hidden ``.NAME.*`` folders) is left behind, and no
  file exists that the reference does not have.

Resume overhead = wall time of all the attempts of a cycle (killed ones included) / the
uninterrupted run's wall time. Everything runs under the CPU thread count given, so the
crosscoder's weights are comparable bitwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .rows import BenchRow, speedup

STAGES = ("collect", "align", "crosscoder")
TIMING_KEYS = ("seconds", "elapsed", "per_s", "time")
TEMP_MARKERS = (".tmp", ".partial")


@dataclass(frozen=True)
class SoakConfig:
    """Sizes and randomness of a soak run (saved in the report's JSON)."""

    cycles: int = 2
    seed: int = 0
    threads: int = 1
    tokens: int = 24_000            # collect --tokens (zoo pair, blocks.0.hook_resid_post)
    shard_mb: float = 0.5           # small shards: many commit points to kill between
    dict_size: int = 512            # crosscoder
    k: int = 16
    batch_size: int = 1024
    cc_tokens: int = 60_000         # ~2.8 epochs of the store's train split
    checkpoint_every: int = 5
    kill_again: float = 0.5         # probability that a repeat is killed too...
    max_kills: int = 3              # ...at most this many kills per cycle and stage
    late_kill: float = 0.6          # probability that a kill lands after the output folder appeared (the
    #                                 reference's time for it), not anywhere in the run: most of a short run
    #                                 is imports and model loading, which a uniform kill time mostly hits
    stages: tuple[str, ...] = STAGES


@dataclass
class Attempt:
    resume: bool
    kill_at: float | None           # seconds after start; None: left to finish
    killed: bool
    returncode: int
    seconds: float
    peak_rss_bytes: int
    stderr_tail: str = ""
    first_output_s: float | None = None  # when the output folder first existed


@dataclass
class StageCycle:
    stage: str
    cycle: int
    attempts: list[Attempt] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)        # killed states that passed for a wrong artifact
    mismatches: list[str] = field(default_factory=list)  # finished artifact vs reference
    leftovers: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)    # a repeat that exited non-zero without a kill

    @property
    def seconds(self) -> float:
        return sum(a.seconds for a in self.attempts)


@dataclass
class SoakResult:
    config: SoakConfig
    reference_seconds: dict[str, float]
    reference_rss: dict[str, int]
    cycles: list[StageCycle]
    seconds: float

    def tally(self) -> dict[str, dict[str, float]]:
        """Per stage: runs, interruptions, resumes, mismatches, torn, leftovers, failures, overhead."""
        out = {}
        for stage in self.config.stages:
            cs = [c for c in self.cycles if c.stage == stage]
            attempts = [a for c in cs for a in c.attempts]
            ref = self.reference_seconds[stage]
            out[stage] = {"cycles": len(cs), "runs": len(attempts) + 1,
                          "interruptions": sum(a.killed for a in attempts),
                          "resumes": sum(a.resume for a in attempts),
                          "mismatches": sum(len(c.mismatches) for c in cs), "torn": sum(len(c.torn) for c in cs),
                          "leftovers": sum(len(c.leftovers) for c in cs), "failures": sum(len(c.failures) for c in cs),
                          "reference_s": ref,
                          "mean_cycle_s": float(np.mean([c.seconds for c in cs])) if cs else float("nan")}
            out[stage]["overhead"] = out[stage]["mean_cycle_s"] / ref if ref > 0 else float("nan")
        return out


# -- the commands ---------------------------------------------------------------------------------
def stage_command(stage: str, out: Path, ref_store: Path, cfg: SoakConfig) -> list[str]:
    """The CLI command of ``stage`` writing to ``out`` (align and crosscoder read the reference store)."""
    cli = [sys.executable, "-m", "diffkit.cli"]
    if stage == "collect":
        return cli + ["collect", "--model-a", "zoo:base", "--model-b", "zoo:finetuned", "--hook",
                      "blocks.0.hook_resid_post", "--tokens", str(cfg.tokens), "--shard-mb", str(cfg.shard_mb),
                      "--device", "cpu", "--quiet", "--out", str(out)]
    if stage == "align":
        return cli + ["align", "--sae-a", "zoo:base", "--sae-b", "zoo:finetuned", "--acts", str(ref_store),
                      "--device", "cpu", "--quiet", "--out", str(out)]
    if stage == "crosscoder":
        return cli + ["crosscoder", "train", "--acts", str(ref_store), "--dict-size", str(cfg.dict_size),
                      "--k", str(cfg.k), "--batch-size", str(cfg.batch_size), "--tokens", str(cfg.cc_tokens),
                      "--checkpoint-every", str(cfg.checkpoint_every), "--log-every", str(cfg.checkpoint_every),
                      "--threads", str(cfg.threads), "--device", "cpu", "--quiet", "--out", str(out)]
    raise ValueError(f"unknown stage {stage!r}")


RESUMABLE = {"collect": True, "align": False, "crosscoder": True}


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    return env


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_attempt(cmd: list[str], threads: int, kill_at: float | None, resume: bool,
                watch: Path | None = None) -> Attempt:
    """Run ``cmd``; SIGKILL it (its whole session) ``kill_at`` seconds after the start unless it ends first.
    ``watch``: the output folder, whose first appearance is timed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(threads),
                            start_new_session=True)
    peak, killed, first = 0, False, None
    while proc.poll() is None:
        peak = max(peak, _vm_hwm(proc.pid))
        if watch is not None and first is None and watch.exists():
            first = time.perf_counter() - t0
        if kill_at is not None and time.perf_counter() - t0 >= kill_at:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the session this call started, nothing else
                killed = True
            except ProcessLookupError:  # it ended between the poll and the kill
                pass
            break
        time.sleep(0.02)
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    killed = killed and proc.returncode == -signal.SIGKILL
    tail = "" if killed else err.decode(errors="replace").strip()[-400:]
    return Attempt(resume, kill_at, killed, proc.returncode, seconds, peak, tail, first)


# -- comparisons ----------------------------------------------------------------------------------
def normalized_json(path: Path, root: Path) -> Any:
    """JSON of ``path`` with timing and checksum keys dropped and the run directory ``root`` written as <OUT>."""
    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            # Checksums (the seal, file sha256s) follow the timings and paths they cover; every file they
            # vouch for is compared itself.
            return {k: clean(v) for k, v in obj.items() if not any(t in k for t in TIMING_KEYS) and "sha256" not in k}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        if isinstance(obj, str):
            return obj.replace(str(root), "<OUT>")
        return obj

    if path.suffix == ".jsonl":
        return [clean(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return clean(json.loads(path.read_text()))


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders under ``root`` (relative paths)."""
    found = []
    for path in root.rglob("*"):
        if path.name.endswith(TEMP_MARKERS) or (path.name.startswith(".") and path.is_dir()):
            found.append(str(path.relative_to(root)))
    return sorted(found)


def compare_trees(ref: Path, got: Path) -> list[str]:
    """Differences between two finished artifacts of the same stage (empty: equal)."""
    from ..io import sha256_file

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    ref_files, got_files = files(ref), files(got)
    problems = [f"missing {p}" for p in sorted(ref_files - got_files)]
    problems += [f"extra {p}" for p in sorted(got_files - ref_files) if not p.endswith(TEMP_MARKERS)]
    for rel in sorted(ref_files & got_files):
        a, b = ref / rel, got / rel
        if rel.endswith((".json", ".jsonl")):
            same = normalized_json(a, ref) == normalized_json(b, got)
        elif rel.endswith(".parquet"):
            import pandas as pd

            same = pd.read_parquet(a).equals(pd.read_parquet(b))
        else:  # tensors (.npy, .safetensors) and CSV: bitwise
            same = sha256_file(a) == sha256_file(b)
        if not same:
            problems.append(f"differs {rel}")
    return problems


def killed_state_problem(stage: str, out: Path, ref: Path) -> str | None:
    """A killed run's output must fail to load (DiffkitError) or load equal to the reference."""
    from ..errors import DiffkitError

    if not out.exists():
        return None
    try:
        if stage == "collect":
            from ..activations import ActivationStore

            ActivationStore.open(out, verify="full")
        elif stage == "align":
            from ..diff import load_table

            load_table(out)
            if (out / "map" / "map.json").exists():
                from ..linear_map import LinearMap

                LinearMap.load(out / "map")
        else:
            from baselines.crosscoder.model import load

            load(out)
    except DiffkitError:
        return None
    except Exception as exc:  # noqa: BLE001 - a traceback-class failure on a killed output is the finding
        return f"{stage}: killed output raised {type(exc).__name__}: {str(exc)[:120]}"
    artifact = {"collect": ["manifest.json"], "align": ["features.parquet", "config.json", "map/map.safetensors"],
                "crosscoder": ["crosscoder.safetensors", "cfg.json"]}[stage]
    diffs = [d for d in compare_trees(ref, out) if d.startswith("differs") and d.split(" ", 1)[1] in artifact]
    return f"{stage}: a killed run left a loadable artifact that differs: {diffs}" if diffs else None


# -- the run --------------------------------------------------------------------------------------
def run_soak(cfg: SoakConfig, work: Path, log: Callable[[str], None] = print) -> SoakResult:
    """References, then ``cfg.cycles`` cycles of kill / repeat / compare per stage, in ``work``."""
    t_start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    work = Path(work)
    ref_dir = work / "reference"
    for old in [ref_dir, *work.glob("cycle_*")]:  # a fresh start: the work folder may hold an earlier run
        shutil.rmtree(old, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    ref_store = ref_dir / "collect"
    ref_s, ref_rss, ref_first = {}, {}, {}
    for stage in ("collect", *[s for s in cfg.stages if s != "collect"]):
        out = ref_dir / stage
        attempt = run_attempt(stage_command(stage, out, ref_store, cfg), cfg.threads, None, False, watch=out)
        if attempt.returncode != 0:
            raise RuntimeError(f"reference {stage} failed: {attempt.stderr_tail}")
        ref_s[stage], ref_rss[stage] = attempt.seconds, attempt.peak_rss_bytes
        ref_first[stage] = min(attempt.first_output_s or 0.0, 0.9 * attempt.seconds) / attempt.seconds  # fraction
        log(f"reference {stage}: {attempt.seconds:.1f} s")
    # The kill window ends at the fastest complete fresh run seen so far: the reference, a cold first start,
    # can be 40% slower than the later runs, and kills past their end interrupt nothing.
    fastest = dict(ref_s)
    cycles = []
    for i in range(cfg.cycles):
        for stage in cfg.stages:
            sc = StageCycle(stage, i)
            out = work / f"cycle_{i:03d}" / stage
            cmd = stage_command(stage, out, ref_store, cfg)
            resume = False
            while True:
                kills = sum(a.killed for a in sc.attempts)
                kill = kills == 0 or (kills < cfg.max_kills and rng.random() < cfg.kill_again)
                lo = ref_first[stage] if rng.random() < cfg.late_kill else 0.05
                kill_at = float(rng.uniform(lo, 1.0) * fastest[stage]) if kill else None
                attempt = run_attempt(cmd + (["--resume"] if resume else []), cfg.threads, kill_at, resume)
                sc.attempts.append(attempt)
                if attempt.killed:
                    problem = killed_state_problem(stage, out, ref_dir / stage)
                    if problem:
                        sc.torn.append(problem)
                    # --resume where the stage has it and the killed run got as far as creating its folder
                    # (otherwise both commands say "drop --resume": nothing was started)
                    resume = RESUMABLE[stage] and out.exists()
                    continue
                if attempt.returncode == 0 and not resume:
                    fastest[stage] = min(fastest[stage], attempt.seconds)
                if attempt.returncode != 0:
                    sc.failures.append(f"exit {attempt.returncode}: {attempt.stderr_tail.splitlines()[-1:]}")
                break
            if not sc.failures:
                sc.mismatches = compare_trees(ref_dir / stage, out)
                sc.leftovers = leftovers(out)
            cycles.append(sc)
            log(f"cycle {i} {stage}: {sum(a.killed for a in sc.attempts)} kills, {sc.seconds:.1f} s, "
                f"{len(sc.mismatches)} mismatches, {len(sc.torn)} torn, {len(sc.leftovers)} leftovers, "
                f"{len(sc.failures)} failures")
    return SoakResult(cfg, ref_s, ref_rss, cycles, time.perf_counter() - t_start)


def soak_config(size: str, cycles: int | None = None, seed: int = 0, threads: int = 1) -> SoakConfig:
    """``small``: ~2 minutes (the share of ``diffkit bench all``); ``full``: ~5 minutes, 30+ interruptions."""
    if size not in ("small", "full"):
        raise ValueError(f"size {size!r}: use 'small' or 'full'")
    default = 2 if size == "small" else 10
    return SoakConfig(cycles=default if cycles is None else cycles, seed=seed, threads=threads)


def rows_from(result: SoakResult) -> list[BenchRow]:
    rows = []
    tally = result.tally()
    for stage, t in tally.items():
        peak = max([result.reference_rss[stage]] + [a.peak_rss_bytes for c in result.cycles if c.stage == stage
                                                    for a in c.attempts])
        rows.append(BenchRow("soak", f"{stage}: interruptions survived (SIGKILL, {t['cycles']} cycles)",
                             float(t["interruptions"]), "count", note=f"{t['resumes']} resumed runs"))
        bad = t["mismatches"] + t["torn"] + t["leftovers"] + t["failures"]
        rows.append(BenchRow("soak", f"{stage}: mismatches vs the uninterrupted run (+ torn, leftovers, failures)",
                             float(bad), "count", baseline="expected", baseline_figure=0.0,
                             peak_rss_bytes=peak, note="a count: 0 is the only passing value"))
        rows.append(BenchRow("soak", f"{stage}: interrupted + resumed wall time per cycle", t["mean_cycle_s"], "s",
                             baseline="uninterrupted run", baseline_figure=t["reference_s"],
                             ratio=speedup(t["mean_cycle_s"], t["reference_s"]), peak_rss_bytes=peak))
    return rows


def summary_rows(size: str, work: Path, threads: int, log: Callable[[str], None]) -> list[BenchRow]:
    """Contract of ``diffkit bench all``: run in ``work``, write nothing under reports/, return the rows."""
    return rows_from(run_soak(soak_config(size, threads=threads), Path(work), log))


def result_to_json(result: SoakResult) -> dict:
    return {"config": asdict(result.config), "reference_seconds": result.reference_seconds,
            "reference_peak_rss_bytes": result.reference_rss, "seconds": result.seconds, "tally": result.tally(),
            "cycles": [asdict(c) for c in result.cycles], "rows": [r.to_dict() for r in rows_from(result)]}
