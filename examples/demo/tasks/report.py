"""A task handler run by the process runner: ``[handlers.report]`` in dspy-infra.toml.

It gets the payload file and the result file as arguments (the
``{payload_file}`` and ``{result_file}`` placeholders of its command), reads
the payload as JSON and writes its result as JSON. Whatever it prints on
stderr is kept: the last lines come back in the error if it fails.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

if __name__ == "__main__":
    payload_file, result_file = sys.argv[1], sys.argv[2]
    with open(payload_file) as f:
        scores: dict[str, float] = json.load(f)["scores"]
    if not scores:
        sys.exit("report: no scores to report on")
    best = max(scores, key=scores.__getitem__)
    result = {
        "best": best,
        "mean": round(statistics.fmean(scores.values()), 3),
        "pid": os.getpid(),
        "attempt": int(os.environ["DSPY_INFRA_ATTEMPT"]),
    }
    with open(result_file, "w") as f:
        json.dump(result, f)
