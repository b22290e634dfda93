"""Render ``bench/quality.py`` results (JSON lines) as the markdown table in docs/benchmarks.md.

    python bench/quality_table.py runs/quality/results.jsonl [--baseline runs/llmc.jsonl]

The optional baseline file holds JSON lines ``{"pruner", "pattern", "sparsity", "perplexity",
"seconds", "peak_rss_mb"}`` from ``bench/llmcompressor_baseline.py`` runs evaluated with
``reconstruct eval``; matching cells get llm-compressor's figures beside ours.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reconstruct.reporting.report import format_or_dash


def key(row: dict) -> tuple:
    sparsity = row.get("sparsity")
    return row["pruner"], row["pattern"], None if row["pattern"] != "unstructured" else round(float(sparsity), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--baseline", type=Path)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    baseline = {}
    if args.baseline and args.baseline.is_file():
        baseline = {key(b): b for b in (json.loads(line) for line in args.baseline.read_text().splitlines() if line.strip())}
    print("| pruner | pattern | method | perplexity | trainable share | device | job s | peak RSS MiB | peak GPU MiB "
          "| llm-compressor perplexity |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["pattern"] == "unstructured":
            shape = f"{row['sparsity']:.0%} unstructured"
        elif row["sparsity"] is not None:  # heads / channels with the fraction of groups removed
            shape = f"{row['pattern']} {row['sparsity']:.0%}"
        else:
            shape = row["pattern"]
        method = " ".join([row["method"], *row.get("flags", [])])
        other = baseline.get(key(row)) if row["method"] == "none" else None
        theirs = f"{other['perplexity']:.2f}" if other else ""
        print(f"| {row['pruner']} | {shape} | {method} | {row['perplexity']:.2f} | {row['trainable_share']:.2%} | "
              f"{row.get('device', 'cpu')} | {row['job_seconds']:.0f} | {row['peak_rss_mb']:.0f} | "
              f"{format_or_dash(row.get('peak_gpu_mb'), '.0f')} | {theirs} |")


if __name__ == "__main__":
    main()
