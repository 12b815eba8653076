"""Print where the pipeline's outputs are: run at the end of `make repro`.

Reads dvc.yaml rather than a list of its own, so it stays true as stages are added.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml


def stage_outputs(dvc_yaml: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Map each stage to its (kind, path) outputs, kind being outs, metrics or plots."""
    table: dict[str, list[tuple[str, str]]] = {}
    for name, stage in dvc_yaml.get("stages", {}).items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                table.setdefault(name, []).append((kind, path))
    return table


def main() -> int:
    table = stage_outputs(yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8")))
    print("\nOutputs (dvc.yaml):")
    for stage, outputs in table.items():
        for kind, path in outputs:
            state = "" if Path(path).exists() else "  (missing: run `dvc repro`)"
            print(f"  {stage:<18} {kind:<8} {path}{state}")
    print("Compare runs with `dvc metrics show`, `dvc metrics diff`, `dvc plots show`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
