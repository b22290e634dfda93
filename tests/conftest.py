"""Shared fixtures: tiny random causal LMs built from transformers configs, saved as safetensors.

Every architecture the engine must stream has one row in ``TINY_CONFIGS``; tests parametrize over
that table instead of copying per-model code.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

# One torch thread per test process (each pytest-xdist worker, and every process a test starts, which
# inherits the variable): the workers share the cores, and a test that claims "the same order, so the
# same bits" compares two computations made with one thread each. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3MoeConfig,
)

from support import figures  # noqa: E402

torch.set_num_threads(1)  # also when torch was imported first (OMP_NUM_THREADS set elsewhere)

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # excerpts carried by the repository (sources and licences: data/README.md)
WIKITEXT_VALID = TEST_DATA / "wikitext-2" / "valid.txt"
WIKITEXT_TEST = TEST_DATA / "wikitext-2" / "test.txt"
PIQA_DATA = TEST_DATA / "piqa"
VOCAB_SIZE = 512
HIDDEN = 64

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256, tie_word_embeddings=True,
    ),
    "opt": lambda: OPTConfig(
        hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB_SIZE,
        word_embed_proj_dim=HIDDEN, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "gpt2": lambda: GPT2Config(
        n_embd=HIDDEN, n_layer=3, n_head=4, vocab_size=VOCAB_SIZE, n_positions=256, bos_token_id=1, eos_token_id=2,
    ),
    "mistral": lambda: MistralConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256, sliding_window=None,
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256,
    ),
    # mixture of experts, experts stacked in 3-D parameters (4 experts, 2 per token), stored per expert
    "mixtral": lambda: MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB_SIZE, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2,
    ),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
    ),
}
MOE_ARCHITECTURES = ("mixtral", "qwen3_moe")
CORE_ARCHITECTURES = ("llama", "opt", "gpt2")


def build_word_tokenizer(text_path: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the most frequent words of a text file (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Counter(re.findall(r"\S+", text_path.read_text(encoding="utf-8")))
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for word, _ in words.most_common(vocab_size - len(specials)):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Build the tiny ``arch`` model with random weights and save it (safetensors + tokenizer)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]())
    with torch.no_grad():  # random biases and norms, so tests see them change or stay
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(folder)
    build_word_tokenizer(WIKITEXT_VALID, VOCAB_SIZE).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- figures
# Jobs run by the tests draw no figures unless the test checks them (tests/support/figures.py): a test
# marked ``figures``, or a module that sets ``DRAWS_FIGURES = True`` (its module-scoped jobs included).
@pytest.fixture(scope="session", autouse=True)
def _figures_off_unless_tested():
    with pytest.MonkeyPatch.context() as patch:
        figures.draw_only_when(lambda: figures.WANTED["on"], patch.setattr)
        yield


@pytest.fixture(scope="module", autouse=True)
def _figures_for_the_module(request, _figures_off_unless_tested):
    before = figures.WANTED["on"]
    figures.WANTED["on"] = before or bool(getattr(request.module, "DRAWS_FIGURES", False))
    yield
    figures.WANTED["on"] = before


@pytest.fixture(autouse=True)
def _figures_for_the_test(request, _figures_for_the_module):
    before = figures.WANTED["on"]
    figures.WANTED["on"] = before or request.node.get_closest_marker("figures") is not None
    yield
    figures.WANTED["on"] = before


def pytest_collection_modifyitems(config, items):
    """Order for parallel workers: the longest work starts first.

    ``--dist loadscope`` (pyproject's addopts) hands each module to one xdist worker, so a
    module-scoped fixture runs once, and sends the modules in the order of ``items``. The real-model
    tests (``slow``) go first, then the modules that set ``SCHEDULE_EARLY = True`` (many whole jobs):
    a long module that starts last keeps one worker busy while the others wait.
    """
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 not getattr(item.module, "SCHEDULE_EARLY", False)))  # stable: module order kept


def pytest_sessionfinish(session):
    """Stop the fork servers of ``forked_cli`` (and wait for them) when the session, or an xdist worker, ends."""
    import sys

    if "forked_cli" in sys.modules:
        sys.modules["forked_cli"].close_servers()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch)`` → folder of a saved tiny model (built once per session)."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = save_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def lm_eval_task_index():
    """lm-eval's index of its bundled tasks, built once per test process.

    Every ``TaskManager()`` (one per zero-shot evaluation) scans the ~15,000 YAML files lm-eval ships:
    about 7 s of CPU. They do not change during a session, so the scan of lm-eval's own folder runs once;
    each manager gets its own dict of copied entries (lm-eval adds names to that dict and deep-copies an
    entry's config before using it). Any other folder (a user's ``include_path``) is scanned every time.
    Modules that evaluate tasks in this process use it: ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    import copy

    try:
        import lm_eval.tasks
        from lm_eval.tasks import _index
    except ImportError:  # the modules that need lm-eval skip themselves
        yield
        return
    bundled = Path(lm_eval.tasks.__file__).resolve().parent
    real = _index.TaskIndex.build
    cache: dict[tuple, dict] = {}

    def build(paths, *, resolve_includes=True):
        paths = [Path(path) for path in paths]
        if any(path.resolve() != bundled for path in paths):
            return real(paths, resolve_includes=resolve_includes)
        key = (len(paths), resolve_includes)
        if key not in cache:
            cache[key] = real(paths, resolve_includes=resolve_includes)
        return {name: copy.copy(entry) for name, entry in cache[key].items()}

    patch = pytest.MonkeyPatch()
    patch.setattr(_index.TaskIndex, "build", staticmethod(build))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def calib_file() -> Path:
    """The WikiText-2 validation excerpt carried in ``tests/data``."""
    assert WIKITEXT_VALID.is_file(), f"missing {WIKITEXT_VALID}"
    return WIKITEXT_VALID


# --------------------------------------------------------------------------- engine-job helpers
# Shared by test_engine_output.py and test_streaming_reference.py: a small calibration text, the
# block-list path per architecture (written down here, independently of the engine's discovery),
# and a session cache of finished in-process jobs so several tests can inspect one output.

SMALL_CALIB_CHARS = 50_000  # enough text for 8 × 32-token windows; tokenizing all of valid.txt costs ~1 s a job
BLOCK_LISTS = {
    "llama": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "mistral": "model.layers",
    "qwen2": "model.layers",
}


def write_text_head(source: Path, chars: int, path: Path) -> Path:
    """Write the first ``chars`` characters of ``source`` to ``path``, cut at a line end; returns ``path``."""
    text = source.read_text(encoding="utf-8")[:chars]
    path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_calib_file(tmp_path_factory) -> Path:
    """The first ~50 kB of the WikiText-2 validation text, cut at a line end."""
    return write_text_head(WIKITEXT_VALID, SMALL_CALIB_CHARS, tmp_path_factory.mktemp("calib") / "valid-head.txt")


def make_job(model: Path, out: Path, pruner: str, pattern: str = "unstructured", sparsity: float | None = None,
             scope: str = "row", calib: Path | str = WIKITEXT_VALID, n_samples: int = 8, seq_len: int = 32,
             seed: int = 0, micro_batch: int = 4, recon=None, model_check: str = "off"):
    """A ``JobConfig`` for an in-process CPU run of the engine.

    ``model_check``: off unless asked for. The check after the loop (on by default for users) has its
    own tests (``test_model_check.py``); the engine's tests compare the loop's bytes, and a check
    that reverts the repairs of a tiny model would change them.
    """
    from pruners.pattern import SparsityPattern
    from reconstruct.config import CalibSpec, JobConfig, PruneSpec

    return JobConfig(
        model=str(model),
        out=Path(out),
        prune=PruneSpec(pruner=pruner, pattern=SparsityPattern.parse(pattern, sparsity, scope)),
        calib=CalibSpec(source=str(calib), n_samples=n_samples, seq_len=seq_len, seed=seed),
        recon=recon,
        device="cpu",
        micro_batch=micro_batch,
        model_check=model_check,
    )


@pytest.fixture(scope="module")
def pruned_llama(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny LLaMA whose block linears are half zero (a retraining student; the tiny LLaMA: its teacher)."""
    import shutil

    from test_retrain import prune_folder

    folder = tmp_path_factory.mktemp("pruned") / "llama"
    shutil.copytree(tiny_model_dir("llama"), folder)
    prune_folder(folder, "llama")
    return folder


@pytest.fixture(scope="session")
def finished_job(tiny_model_dir, small_calib_file, tmp_path_factory):
    """``finished_job(arch, pruner, pattern, sparsity, scope)`` → ``(job, report)``, run once per session."""
    from reconstruct.jobs.run_job import run_job

    cache: dict[tuple, tuple] = {}

    def run(arch: str, pruner: str, pattern: str = "unstructured", sparsity: float | None = None, scope: str = "row"):
        key = (arch, pruner, pattern, sparsity, scope)
        if key not in cache:
            name = "-".join(str(part) for part in key).replace(":", "of")
            job = make_job(tiny_model_dir(arch), tmp_path_factory.mktemp(f"job-{name}") / "out", pruner,
                           pattern, sparsity, scope, calib=small_calib_file)
            cache[key] = (job, run_job(job))
        return cache[key]

    return run
