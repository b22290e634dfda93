"""Each block's log line names what its numbers are (share of channels removed vs of weights zeroed)."""

from __future__ import annotations

import logging

from typer.testing import CliRunner

from cli import app
from pruners.structured import ChannelGroups, HeadGroups
from reconstruct.jobs.run_job import describe_block_sparsity
from reconstruct.loop.block_report import BlockReport, describe_structure


def test_channels_line_names_both_numbers():
    report = BlockReport(index=0, sparsity={"up": 0.35, "gate": 0.35, "down": 0.35, "q": 0.0, "k": 0.0, "v": 0.0,
                                            "o": 0.0}, removed={"channels": list(range(35))})
    line = describe_block_sparsity(report, ChannelGroups(up=("up", "gate"), down="down", channels=100))
    assert line == "channels removed 35% (35 of 100); linear weights zero 15.0%"


def test_heads_and_unstructured_lines():
    heads = HeadGroups(query="q", key_value=("k", "v"), output="o", num_heads=8, num_kv_heads=8, head_dim=4)
    report = BlockReport(index=0, sparsity={"q": 0.25, "o": 0.25}, removed={"heads": [0, 1], "kv_heads": [0, 1]})
    assert describe_block_sparsity(report, heads) == "heads removed 25% (2 of 8); linear weights zero 25.0%"
    assert describe_block_sparsity(BlockReport(index=0, sparsity={"q": 0.5})) == "linear weights zero 50.0%"
    assert "HeadGroups(" not in describe_structure(heads) and "8 attention heads of 4" in describe_structure(heads)


def test_run_logs_no_dataclass_repr_at_info(tiny_model_dir, small_calib_file, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(app, ["run", "--model", str(tiny_model_dir("llama")), "--calib", str(small_calib_file),
                                          "--n-samples", "2", "--seq-len", "16", "--device", "cpu", "--method", "none",
                                          "--pattern", "channels", "--sparsity", "0.35", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert not [m for m in messages if "Groups(" in m or "[[" in m], messages
    blocks = [m for m in messages if m.startswith("block 1/")]
    assert blocks and "channels removed 35%" in blocks[0] and "linear weights zero" in blocks[0], blocks
