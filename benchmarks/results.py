"""Writing a benchmark's result: one JSON file under benchmarks/results/, also printed."""

import json
from pathlib import Path
from typing import Any


def write_result(result: dict[str, Any], out: str) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
