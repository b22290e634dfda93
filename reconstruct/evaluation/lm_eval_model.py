"""The model as an lm-evaluation-harness model, served by the in-memory or the block-streamed forward.

``ReconstructLM`` implements lm-eval's ``TemplateLM`` (``loglikelihood``, ``loglikelihood_rolling``)
on any object with ``logits(token_sets, micro_batch, desc)`` from ``reconstruct.evaluation.streaming``
(``InMemoryLM`` or ``StreamedLM``). It scores requests the way lm-eval's ``HFLM`` does, so the two
agree item for item:

- tokens: ``TemplateLM._encode_pair`` (trailing context spaces move to the continuation; continuation
  tokens = ``encode(context + continuation)[len(encode(context)):]``); ``tok_encode`` puts the BOS in
  front exactly when ``calib.framing`` says the model reads one (``--calib-bos``; for ``auto`` that is
  when the tokenizer adds one, as HFLM's default ``add_bos_token=None`` does);
- length: lm-eval's ``resolve_max_length`` (config, then tokenizer, then 2048); a longer request loses
  tokens on the left;
- order and batches: lm-eval's own ``Collator`` (longest first, requests that share ``context +
  continuation[:-1]`` run once), right-padded with id 0, ``batch_size`` sequences per forward;
- ``loglikelihood_rolling``: lm-eval's rolling windows with its prefix token.

All requests of a call go to ``logits`` together, so the streamed model reads each block once per
call, not once per request; only the activations of one call are held (``pass_bytes`` splits a call
into several passes when they would not fit). Log-softmax is taken in float32 (HFLM takes it in the
model's dtype: the same for float32 models). ``generate_until`` is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psutil
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, resolve_max_length
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from calib.framing import SequenceFraming

logger = logging.getLogger(__name__)

PAD_ID = 0  # right padding, as lm-eval's pad_and_concat: never attended to by the tokens before it
DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM fallback when neither config nor tokenizer names a length
PASS_MEMORY_SHARE = 0.25  # a streamed pass holds at most this share of the available host memory in activations
GENERATION_REFUSAL = (
    "generative tasks (lm-eval output_type generate_until) are not supported by `reconstruct eval`: "
    "it scores log-likelihoods only (multiple-choice, loglikelihood and perplexity tasks); "
    "run lm-eval's own `hf` model on the output folder for generation tasks"
)

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context ids, continuation ids)


class ReconstructLM(TemplateLM):
    """lm-eval's model interface over an ``InMemoryLM`` or ``StreamedLM``.

    Args:
        lm: the model (``reconstruct.evaluation.streaming.open_lm``).
        tokenizer: its tokenizer.
        framing: whether sequences start with a BOS (``calib.framing.resolve_framing``).
        batch_size: sequences per forward.
        max_length: longest input; None: lm-eval's rule for the model.
        pass_bytes: activation bytes one streamed pass may hold; None: a share of available memory.
    """

    def __init__(self, lm, tokenizer, framing: SequenceFraming, batch_size: int = 1,
                 max_length: int | None = None, pass_bytes: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1; got {batch_size}")
        self.lm = lm
        self.tokenizer = tokenizer
        self.framing = framing
        self.batch_size = batch_size
        self._max_length = max_length or resolve_max_length(lm.config, tokenizer, default=DEFAULT_MAX_LENGTH)
        self.pass_bytes = pass_bytes
        self.passes = 0  # forward passes over the model so far (a streamed pass reads every block once)

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token in front of an empty context and of rolling windows (HFLM: the BOS, else the EOS)."""
        if self.framing.bos_id is not None:
            return self.framing.bos_id
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.lm.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of ``string``: the framing's BOS first unless ``add_special_tokens`` is False."""
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        bos = self.framing.bos_id
        if add_special_tokens is not False and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole text, in lm-eval's disjoint rolling windows."""
        windows: list[Request] = []
        counts = []
        for (string,) in [request.args for request in requests]:
            rolling = [make_disjoint_window(window) for window in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, *window) for window in rolling]
            counts.append(len(rolling))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for request, count in zip(requests, counts):
            totals.append(sum(score for score, _ in scores[start : start + count]))
            start += count
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise ValueError(GENERATION_REFUSAL)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """``(summed log-probability of the continuation, whether it is the greedy one)`` per request."""
        order = Collator(requests, sort_fn=_longest_first, group_by="contexts", group_fn=_shared_prefix)
        chunks = list(order.get_batched(n=self.batch_size))
        results: list[tuple[float, bool]] = []
        for chunk_group in self._passes(chunks):
            self.passes += 1
            inputs = [[self._input_ids(context, continuation) for _, context, continuation in chunk]
                      for chunk in chunk_group]
            token_sets = [_right_padded(rows) for rows in inputs]
            for set_index, rows, logits in self.lm.logits(token_sets, self.batch_size, desc="lm-eval"):
                for row in range(rows.start, rows.stop):
                    strings, context, continuation = chunk_group[set_index][row]
                    length = len(inputs[set_index][row])
                    scored = logits[row - rows.start, length - len(continuation) : length]  # (c, V)
                    log_probs = torch.log_softmax(scored.float(), dim=-1)[None]  # (1, c, V)
                    greedy = log_probs.argmax(dim=-1)  # (1, c)
                    for strings_i, continuation_i, log_probs_i in order.get_cache(
                        req_str=strings, cxt_toks=context, cont_toks=continuation, logits=log_probs
                    ):
                        targets = torch.tensor(continuation_i, dtype=torch.long, device=log_probs_i.device)[None]  # (1, c)
                        is_greedy = bool((greedy[:, -targets.shape[1]:] == targets).all())
                        score = float(torch.gather(log_probs_i, 2, targets[..., None]).sum())
                        results.append((score, is_greedy))
                        self.cache_hook.add_partial("loglikelihood", strings_i, (score, is_greedy))
        return order.get_original(results)

    def _input_ids(self, context: list[int], continuation: list[int]) -> list[int]:
        """What the model reads: all tokens but the last, left-truncated to ``max_length`` (as HFLM)."""
        if not context or not continuation:
            raise ValueError("lm-eval sent a request with an empty context or continuation")
        whole = context + continuation
        if len(whole) > self.max_length + 1:
            logger.warning("a request of %d tokens exceeds the model's %d: truncated on the left",
                           len(whole), self.max_length)
        return whole[-(self.max_length + 1):][:-1]

    def _passes(self, chunks: list[list[Request]]) -> Iterator[list[list[Request]]]:
        """Chunks grouped so that one streamed pass's activations fit ``pass_bytes`` (in memory: one group)."""
        if not getattr(self.lm, "streamed", False):
            if chunks:
                yield chunks
            return
        budget = self.pass_bytes if self.pass_bytes is not None else int(
            PASS_MEMORY_SHARE * psutil.virtual_memory().available)
        per_token = self.lm.loaded.hidden_size * torch.finfo(self.lm.loaded.dtype).bits // 8  # one hidden state
        group, used = [], 0
        for chunk in chunks:
            width = max(min(len(c) + len(t), self.max_length + 1) - 1 for _, c, t in chunk)
            size = len(chunk) * width * per_token
            if group and used + size > budget:
                yield group
                group, used = [], 0
            group.append(chunk)
            used += size
        if group:
            yield group


def _longest_first(request: Request):
    """HFLM's order: longest first, then by the tokens (a deterministic order for equal lengths)."""
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


def _shared_prefix(request: Request):
    """HFLM's grouping: requests with the same context + continuation[:-1] share one forward."""
    return request[-2] + request[-1][:-1]


def _right_padded(rows: list[list[int]]) -> torch.Tensor:
    """(b, T) ids, each row followed by ``PAD_ID`` up to the longest."""
    tokens = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)  # (b, T)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens
