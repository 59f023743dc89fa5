"""Submit the trainer to a Ray cluster as a job, follow it, and fetch its results.

    python -m cluster.submit --config configs/smoke.yaml [overrides ...] [--address URL] [--no-wait]
    python -m cluster.submit status JOB_ID | logs JOB_ID [--follow] | stop JOB_ID | list

The address comes from --address or RAY_JOB_ADDRESS / RAY_ADDRESS (e.g. http://HEAD:8265); a bearer
token, if the cluster needs one, only from RAY_JOB_TOKEN or the file named by RAY_JOB_TOKEN_FILE, never
from a config or the command line.
The repo root is uploaded as the job's working directory (without .venv, data and outputs).
Results: with a directory --storage (a path every node and this machine can read; default runs/jobs on this
machine, right for a local cluster) the job's output.dir is STORAGE/JOB_ID. With a URI --storage
(s3://bucket/runs, gs://..., anything pyarrow.fs opens) the job's output.storage (checkpoints, results.json,
metrics.jsonl) is URI/JOB_ID and its output.dir (prepared data) is --output-dir/JOB_ID. results.json is read
from the storage (a URI through pyarrow.fs), else from output.dir, else from the job's log, where the trainer
prints it last.
"""

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ray.job_submission import JobSubmissionClient

from trainer import storage as stores
from trainer.config import load_config
from trainer.driver.report import RESULTS_MARKER

REPO = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv", ".git", "runs", "datasets", "data_cache", "**/__pycache__", "*.parquet", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: Optional[str]):
    address = address or os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SystemExit("no cluster address: pass --address http://HEAD:8265 or set RAY_JOB_ADDRESS")
    token = os.environ.get("RAY_JOB_TOKEN")
    if not token and os.environ.get("RAY_JOB_TOKEN_FILE"):  # e.g. the token file of a cluster.local head
        token = Path(os.environ["RAY_JOB_TOKEN_FILE"]).read_text().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def runtime_env(deps: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "working_dir": str(REPO),
        "excludes": EXCLUDES,
        # No DS_ACCELERATOR: each worker sets it from its own device (trainer/distributed/dense.py).
        "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"},
    }
    if deps != "image":  # by default the cluster image already holds the locked environment
        env["pip"] = {"packages": str(REPO / "requirements" / f"{deps}.lock"), "pip_check": False}
    return env


def entrypoint(config: str, overrides: Sequence[str], output_dir: str, storage: Optional[str] = None) -> str:
    args = ["python", "-m", "trainer.train", "--config", config, *overrides, f"output.dir={output_dir}",
            *([f"output.storage={storage}"] if storage else []), "--print-results"]
    return " ".join(_quote(a) for a in args)


def configured_storage(config: Path, overrides: Sequence[str]) -> str:
    """output.storage as the config file and overrides set it ("" if not)."""
    try:
        return load_config(config, overrides).output.storage
    except ValueError:
        return ""  # the job's own config check reports it


def _quote(s: str) -> str:
    return shlex.quote(s)


def follow(c, job_id: str) -> str:
    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream can drop; the status poll below is authoritative
        print(f"[log stream ended: {e}]", file=sys.stderr)
    while (status := str(c.get_job_status(job_id)).split(".")[-1]) not in TERMINAL:
        time.sleep(2)
    return status


def fetch_results(c, job_id: str, output_dir: str, storage: Optional[str] = None) -> Optional[dict]:
    """From the job's output.storage (a directory or a URI) if set and readable from here, else from its
    output.dir, else from its log."""
    if storage and (stores.is_uri(storage) or Path(storage).is_absolute()):
        try:
            text = stores.read_text(stores.join(stores.location(storage), "results.json"))
        except Exception as e:  # no credentials or no route from this machine: the log still has it
            print(f"[results.json not readable from {storage}: {e}]", file=sys.stderr)
            text = None
        if text is not None:
            return json.loads(text)
    path = Path(output_dir) / "results.json"
    if path.is_file():
        return json.loads(path.read_text())
    for line in reversed(c.get_job_logs(job_id).splitlines()):
        if line.startswith(RESULTS_MARKER):
            return json.loads(line[len(RESULTS_MARKER):])
    return None


def submit(args: argparse.Namespace) -> int:
    config = Path(args.config)
    if not (REPO / config).is_file() and not config.is_file():
        raise SystemExit(f"config {args.config} not found (paths are relative to the repo root)")
    job_id = args.job_id or f"convformer-{time.strftime('%Y%m%d-%H%M%S')}"
    job_storage = None  # output.storage set by --storage
    if args.storage and stores.is_uri(args.storage):  # the job's config check validates it, where it is used
        job_storage = str(stores.join(args.storage, job_id))
        parent = Path(args.output_dir).resolve() if args.output_dir else REPO / "runs" / "jobs"
    else:
        parent = Path(args.storage).resolve() if args.storage else REPO / "runs" / "jobs"
        if args.output_dir:  # data apart from the checkpoints and results
            job_storage = str(parent / job_id)
            parent = Path(args.output_dir).resolve()
    output_dir = str(parent / job_id)
    c = client(args.address)
    c.submit_job(
        entrypoint=entrypoint(str(config), args.overrides, output_dir, job_storage),
        submission_id=job_id,
        runtime_env=runtime_env(args.deps),
        entrypoint_num_cpus=0,
    )
    print(f"submitted {job_id}; output.dir={output_dir}" + (f", output.storage={job_storage}" if job_storage else ""),
          flush=True)
    if args.no_wait:
        print(f"  python -m cluster.submit logs {job_id} --follow")
        return 0
    status = follow(c, job_id)
    print(f"job {job_id}: {status}")
    if status != "SUCCEEDED":
        return 1
    stored = job_storage or configured_storage(REPO / config if (REPO / config).is_file() else config, args.overrides)
    results = fetch_results(c, job_id, output_dir, stored)
    if results is None:
        print("results.json not found in storage or in the job log", file=sys.stderr)
        return 1
    local = Path(args.results_to or output_dir) / "results.json"
    local.parent.mkdir(parents=True, exist_ok=True)
    if not local.exists():
        local.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {local}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("status", "logs", "stop", "list"):
        p = argparse.ArgumentParser(prog=f"python -m cluster.submit {argv[0]}")
        p.add_argument("--address", default=None)
        if argv[0] != "list":
            p.add_argument("job_id")
        if argv[0] == "logs":
            p.add_argument("--follow", action="store_true")
        args = p.parse_args(argv[1:])
        c = client(args.address)
        if argv[0] == "list":
            for job in c.list_jobs():
                print(f"{job.submission_id}\t{job.status}\t{job.entrypoint}")
        elif argv[0] == "status":
            print(c.get_job_status(args.job_id))
        elif argv[0] == "stop":
            print("stopped" if c.stop_job(args.job_id) else "already finished")
        elif args.follow:
            return 0 if follow(c, args.job_id) == "SUCCEEDED" else 1
        else:
            print(c.get_job_logs(args.job_id), end="")
        return 0

    p = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config path relative to the repo root")
    p.add_argument("--address", default=None, help="job server URL (default: RAY_JOB_ADDRESS or RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="submit and return the job id")
    p.add_argument("--job-id", default=None)
    p.add_argument("--storage", default=None,
                   help="directory shared by the cluster and this machine for outputs (output.dir), or a URI "
                        "(s3://bucket/runs) for checkpoints and results (output.storage)")
    p.add_argument("--output-dir", default=None,
                   help="where output.dir (prepared data) goes, a path every node mounts; then --storage only holds "
                        "checkpoints and results (default: a directory --storage, else runs/jobs in the repo here, "
                        "right for a local cluster)")
    p.add_argument("--results-to", default=None, help="where to copy results.json (default: beside the output)")
    p.add_argument("--deps", default="image", choices=["image", "cpu", "gpu"],
                   help="image: the cluster image has the environment; cpu/gpu: pip-install that lock per job")
    p.add_argument("overrides", nargs="*")
    return submit(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
