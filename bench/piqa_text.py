"""Write PIQA's goals with their correct solutions as one plain text: a second kind of text to score on.

WikiText-2 (the calibration and test text of docs/benchmarks.md) is encyclopaedia prose; PIQA's
goal-and-solution pairs are short instructions about everyday physical tasks. Items are joined by
blank lines, in file order; ``--start``/``--stop`` pick a range, so that a scored text and a
validation text (``--recon-val-data``) can be disjoint.

    python bench/piqa_text.py --stop 900 > piqa-first900.txt
    python bench/piqa_text.py --start 900 > piqa-rest.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def goal_and_solution_text(questions: Path, labels: Path, start: int = 0, stop: int | None = None) -> str:
    """Each item's goal, a space and its correct solution; items joined by blank lines."""
    items = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = [int(value) for value in labels.read_text().split()]
    if len(items) != len(answers):
        raise SystemExit(f"{questions} has {len(items)} items but {labels} has {len(answers)} labels")
    pairs = list(zip(items, answers))[start:stop]
    return "\n\n".join(f"{item['goal']} {item['sol1'] if answer == 0 else item['sol2']}" for item, answer in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=Path, default=Path("../shared/data/piqa/valid.jsonl"))
    parser.add_argument("--labels", type=Path, default=Path("../shared/data/piqa/valid-labels.lst"))
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=None)
    args = parser.parse_args()
    print(goal_and_solution_text(args.questions, args.labels, args.start, args.stop))


if __name__ == "__main__":
    main()
