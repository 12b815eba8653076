"""Stage `report`: the key metrics of every stage as one short table.

    python -m stages.report --output metrics/summary.md

`dvc repro` runs it after the stages whose metrics changed and writes `metrics/summary.md`;
`make repro` runs it again without `--output`, which prints the table with this machine's timings
beside it. The file holds only metrics (deterministic for the same inputs); timings come from
`output/timings/` and are printed, never written to a DVC output.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lmpipeline import stage
from lmpipeline.data import write_text_atomic
from lmpipeline.params import Params
from lmpipeline.report import markdown, metric_rows, timing_rows
from lmpipeline.stage import TIMINGS


@dataclass(frozen=True)
class ReportPaths:
    stage: ClassVar[str] = "report"
    metrics: Path = Path("metrics")
    """The metrics directory of the stages."""
    timings: Path = TIMINGS
    """The timings directory of the stages (printed without --output)."""
    output: Path | None = None
    """Write the metrics table here (Markdown) instead of printing it with the timings."""


def run(params: Params, paths: ReportPaths) -> None:
    rows = metric_rows(paths.metrics)
    if paths.output:
        write_text_atomic(paths.output, markdown(rows))
    else:
        rows += timing_rows(paths.timings)
    print("\n" + markdown(rows))
    print("Compare runs: dvc exp show, dvc metrics diff, dvc params diff, dvc plots diff.")


def main(argv: list[str] | None = None) -> int:
    return stage.main(ReportPaths, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
