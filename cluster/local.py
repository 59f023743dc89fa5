"""A local Ray head for experiments, bound to 127.0.0.1 (GCS, dashboard and job server alike).

    python -m cluster.local start [--num-cpus N] [--object-store-gib G] [--port 6379] [--dashboard-port 8265]
    python -m cluster.local status
    python -m cluster.local stop

Then submit with `python -m cluster.submit --address http://127.0.0.1:8265 ...` or use RAY_ADDRESS=127.0.0.1:6379
for `python -m trainer.train`. Binding elsewhere needs --host, deliberately.
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def start_command(
    host: str = "127.0.0.1",
    port: int = 6379,
    dashboard_port: int = 8265,
    num_cpus: Optional[int] = None,
    object_store_gib: Optional[float] = None,
) -> list[str]:
    # Ray's default object store takes 30% of memory; on a laptop 10% (at most 4 GiB) leaves room for training.
    store = int((object_store_gib or min(4.0, 0.1 * _total_memory_bytes() / 2**30)) * 2**30)
    return [
        _ray_cli(), "start", "--head",
        f"--node-ip-address={host}",
        f"--port={port}",
        "--include-dashboard=true",  # the job server lives in the dashboard
        f"--dashboard-host={host}",
        f"--dashboard-port={dashboard_port}",
        f"--num-cpus={num_cpus or os.cpu_count() or 1}",
        f"--object-store-memory={store}",
        "--disable-usage-stats",
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("start", help="start a local head node")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=int, default=6379)
    s.add_argument("--dashboard-port", type=int, default=8265)
    s.add_argument("--num-cpus", type=int, default=None)
    s.add_argument("--object-store-gib", type=float, default=None)
    st = sub.add_parser("status", help="show the cluster's resources")
    st.add_argument("--address", default=None, help="GCS address (default: the local head)")
    sub.add_parser("stop", help="stop every Ray process started on this machine")
    args = p.parse_args(argv)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    if args.action == "start":
        cmd = start_command(args.host, args.port, args.dashboard_port, args.num_cpus, args.object_store_gib)
        rc = subprocess.call(cmd, env=env)
        if rc == 0:
            print(f"\nJob server: http://{args.host}:{args.dashboard_port}   GCS: {args.host}:{args.port}")
            print(f"  python -m cluster.submit --address http://{args.host}:{args.dashboard_port} --config configs/smoke.yaml")
        return rc
    if args.action == "status":
        cmd = [_ray_cli(), "status"] + ([f"--address={args.address}"] if args.address else [])
        return subprocess.call(cmd, env=env)
    return subprocess.call([_ray_cli(), "stop"], env=env)


if __name__ == "__main__":
    sys.exit(main())
