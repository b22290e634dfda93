"""One failing rank stops every rank within seconds, with the failing rank's message (2 gloo processes).

Each case runs ``distributed.agree`` (or ``from_main``) with one rank raising; every rank records
what it raised and how long that took. Before ``agree`` forwarded every exception type, the rank
that did not fail waited in its all-gather until the group's timeout (``GROUP_TIMEOUT_S`` here).
The group is joined through ``distributed.join``, as under torchrun, so ``from_main`` uses the
long-timeout group for waits on rank 0.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reconstruct.parallel import distributed

WORLD = 2
GROUP_TIMEOUT_S = 60  # a rank stuck in a collective fails only after this; every case must end far sooner
PROMPT_S = 15  # "within seconds": generous for a loaded 2-core machine, far below GROUP_TIMEOUT_S


def _raiser(rank: int, error: Exception):
    """A ``compute`` that raises ``error`` on ``rank`` and returns the rank elsewhere."""

    def compute():
        if distributed.world().rank == rank:
            raise error
        return distributed.world().rank

    return compute


CASES = {  # name → how every rank calls the helper
    "agree-runtime-error-on-rank-1": lambda: distributed.agree(_raiser(1, RuntimeError("CUDA out of memory"))),
    "agree-key-error-on-rank-0-main-first": lambda: distributed.agree(_raiser(0, KeyError("lm_head")), main_first=True),
    "agree-value-error-on-rank-1": lambda: distributed.agree(_raiser(1, ValueError("--gpu-memory: too small"))),
    "from-main-runtime-error": lambda: distributed.from_main(_raiser(0, RuntimeError("disk on fire"))),
    "agree-no-error": lambda: distributed.agree(lambda: distributed.world().rank),
}


def _worker(rank: int, port: int, results: Path) -> None:
    """One rank: join the group as under torchrun, then run every case, recording what it raised."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **{distributed.STEP_TIMEOUT_ENV: str(GROUP_TIMEOUT_S / 60),
                                                distributed.TIMEOUT_ENV: str(GROUP_TIMEOUT_S / 60)})
    distributed.join(SimpleNamespace(device="cpu"))
    outcomes = {}
    for name, call in CASES.items():
        started = time.monotonic()
        try:
            outcome = {"returned": call()}
        except Exception as error:  # noqa: BLE001 - recorded for the test to check
            outcome = {"raised": type(error).__name__, "message": str(error)}
        outcomes[name] = {**outcome, "seconds": time.monotonic() - started}
    (results / f"rank{rank}.json").write_text(json.dumps(outcomes))
    distributed.leave()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """``outcomes[rank][case]``: what each of the 2 ranks raised or returned, and how long it took."""
    from test_distributed import _free_port

    results = tmp_path_factory.mktemp("failures")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    return [json.loads((results / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize(("case", "failing", "kind", "text"), [
    ("agree-runtime-error-on-rank-1", 1, "RuntimeError", "CUDA out of memory"),
    ("agree-key-error-on-rank-0-main-first", 0, "KeyError", "lm_head"),
    ("from-main-runtime-error", 0, "RuntimeError", "disk on fire"),
])
def test_any_exception_on_one_rank_stops_every_rank_promptly(outcomes, case, failing, kind, text):
    mine, other = outcomes[failing][case], outcomes[1 - failing][case]
    assert mine["raised"] == kind and text in mine["message"]
    assert other["raised"] == "RuntimeError"  # not a user error: not exit code 2 on the other ranks
    assert f"rank {failing} failed" in other["message"] and text in other["message"]
    if case.startswith("agree"):
        assert kind in other["message"]  # the type of the original error travels with its message
    assert max(mine["seconds"], other["seconds"]) < PROMPT_S


def test_a_user_error_on_one_rank_is_a_user_error_on_every_rank(outcomes):
    for rank in range(WORLD):
        outcome = outcomes[rank]["agree-value-error-on-rank-1"]
        assert outcome["raised"] == "ValueError" and "--gpu-memory: too small" in outcome["message"]
        assert outcome["seconds"] < PROMPT_S
    assert outcomes[0]["agree-value-error-on-rank-1"]["message"].startswith("rank 1: ")


def test_the_group_still_works_after_a_forwarded_failure(outcomes):
    assert [outcomes[rank]["agree-no-error"]["returned"] for rank in range(WORLD)] == [0, 1]
