"""Writing a benchmark's result: one JSON file under benchmarks/results/, also printed, with where and when it
was measured (`provenance`)."""

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def provenance(load_before: tuple[float, ...]) -> dict[str, Any]:
    """The machine, the commit, the date and the load average before (`os.getloadavg()` at the start) and now."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "commit": commit, "date": time.strftime("%Y-%m-%d"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(result: dict[str, Any], out: str) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
