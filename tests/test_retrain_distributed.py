"""Model-level retraining under data parallelism: 2 gloo ranks equal one process, bit for bit.

Each step takes 4 windows in micro-batches of 2: one process sums the gradients of its two
micro-batches, each of the 2 ranks computes one of them and the all-reduce sums the two. Float
addition of two terms is commutative, so the parameters, the output bytes and the loss curves are the
same as one process's exactly (no tolerance); the held-out loss is computed whole on every rank.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import torch

from test_retrain import block_tensors, pruned_dir, small_spec, windows  # noqa: F401 (pruned_dir: a fixture)

WORLD = 2
PATHS = (True, False)  # streamed, resident


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, model: str, root: str) -> None:
    """One rank: both paths; rank 0 writes the folders, every rank its result."""
    from reconstruct.modelio.loaded import load_model
    from reconstruct.retrain import retrain_model

    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    for stream in PATHS:
        loaded = load_model(model, "cpu", "float32")
        result = retrain_model(loaded, small_spec("masklora", val_fraction=0.25), "", Path(root) / f"dist-{stream}",
                               stream=stream, tokens=windows())
        results[str(stream)] = {"loss": result.loss_curve, "val": result.val_curve}
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(pruned_dir, tmp_path):
    from reconstruct.modelio.loaded import load_model
    from reconstruct.retrain import retrain_model

    model = pruned_dir("llama")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(model), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    for stream in PATHS:
        loaded = load_model(str(model), "cpu", "float32")
        single = retrain_model(loaded, small_spec("masklora", val_fraction=0.25), "", tmp_path / f"one-{stream}",
                               stream=stream, tokens=windows())
        for rank in ranks:
            assert rank[str(stream)]["loss"] == single.loss_curve
            assert [tuple(item) for item in rank[str(stream)]["val"]] == single.val_curve
        expected = block_tensors(tmp_path / f"one-{stream}", loaded.layout.n_blocks)
        written = block_tensors(tmp_path / f"dist-{stream}", loaded.layout.n_blocks)
        assert expected.keys() == written.keys()
        for key in expected:
            assert torch.equal(expected[key], written[key]), key
