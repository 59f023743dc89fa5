"""A local Ray head for experiments on this machine (dashboard and job server on 127.0.0.1).

    python -m cluster.local start [--port 6379] [--dashboard-port 8265] [--num-cpus N] [--object-store-gib G]
    python -m cluster.local status [--port 6379]
    python -m cluster.local stop [--port 6379]

Then submit with `python -m cluster.submit --address http://127.0.0.1:8265 ...`, or run
`RAY_ADDRESS=127.0.0.1:6379 python -m trainer.train ...` to join it.

Each head keeps its files in its own temp dir (default /tmp/ray-convformer-PORT) and records its process
group there; `stop` ends that process group only. It never runs `ray stop`, which ends every Ray process
on the machine, other people's included.

Authentication: each head gets its own token (TEMP_DIR/auth_token, readable by its owner only) and runs with
Ray's token authentication on; clients pass it with RAY_JOB_TOKEN_FILE=TEMP_DIR/auth_token (cluster.submit)
or RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=TEMP_DIR/auth_token (Ray's own tools).

Networking: every listening socket of the head (GCS, raylet, object manager, dashboard and job server,
agents, Ray client server) is on 127.0.0.1: `ray start` would replace --node-ip-address=127.0.0.1 by the
machine's outward address, so the head runs with Ray's single-machine switch instead (see head_env).
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

HOST = "127.0.0.1"
STATE = "convformer-head.json"


@dataclass
class Head:
    port: int  # GCS
    dashboard_port: int  # dashboard and job server
    temp_dir: str
    pgid: int  # the process group of every process the head started

    @property
    def address(self) -> str:  # for RAY_ADDRESS / ray.init
        return f"{HOST}:{self.port}"

    @property
    def job_address(self) -> str:  # for cluster.submit / JobSubmissionClient
        return f"http://{HOST}:{self.dashboard_port}"

    def token(self) -> str:
        return token_path(self.temp_dir).read_text().strip()


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def default_temp_dir(port: int) -> str:
    # Short: Ray puts unix sockets under it (at most 107 characters per path).
    return f"/tmp/ray-convformer-{port}"


def start_command(
    port: int = 6379,
    dashboard_port: int = 8265,
    temp_dir: Optional[str] = None,
    num_cpus: Optional[int] = None,
    object_store_gib: Optional[float] = None,
) -> list[str]:
    # Ray's default object store takes 30% of memory; 10% (at most 4 GiB) leaves room for training.
    store = int((object_store_gib or min(4.0, 0.1 * _total_memory_bytes() / 2**30)) * 2**30)
    return [
        _ray_cli(), "start", "--head",
        f"--port={port}",
        "--include-dashboard=true",  # the job server lives in the dashboard
        f"--dashboard-host={HOST}",
        f"--dashboard-port={dashboard_port}",
        # a fixed default (52365) would collide with any other head on this machine
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",  # its default, 10001, would collide too
        f"--num-cpus={num_cpus if num_cpus is not None else os.cpu_count() or 1}",
        f"--object-store-memory={store}",
        f"--temp-dir={temp_dir or default_temp_dir(port)}",
        "--disable-usage-stats",
    ]


def token_path(temp_dir: str) -> Path:
    return Path(temp_dir) / "auth_token"


def _ensure_token(temp_dir: str) -> Path:
    """This head's own bearer token (owner-only file): the GCS and the job server refuse calls without it."""
    path = token_path(temp_dir)
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def head_env(temp_dir: str) -> dict[str, str]:
    """The environment of the head's processes, and of clients that talk to it (`ray status`, jobs)."""
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Token authentication, explicitly: Ray 2.60 turns it on only when ~/.ray/auth_token happens to exist.
    # Jobs inherit both variables, so their drivers can join the cluster.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path(temp_dir))
    env.pop("RAY_AUTH_TOKEN", None)
    # `ray start` turns --node-ip-address=127.0.0.1 into the machine's outward address; with this Ray
    # uses the loopback address for the node itself (Ray's switch for single-machine clusters).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # A job's entrypoint says `python`: make that this interpreter (the project's venv), not the system one.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start(
    port: int = 6379,
    dashboard_port: int = 8265,
    temp_dir: Optional[str] = None,
    num_cpus: Optional[int] = None,
    object_store_gib: Optional[float] = None,
    timeout_s: float = 180.0,
    quiet: bool = False,
    attempts: int = 3,
) -> Head:
    """Start a head in its own process group, wait for its job server, record it in its temp dir."""
    temp_dir = temp_dir or default_temp_dir(port)
    if (existing := read_state(temp_dir)) is not None and _alive(existing):
        raise RuntimeError(f"a head already runs from {temp_dir} (GCS port {existing.port}); stop it first")
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    _ensure_token(temp_dir)
    out = subprocess.DEVNULL if quiet else None
    for attempt in range(1, attempts + 1):
        cmd = start_command(port, dashboard_port, temp_dir, num_cpus, object_store_gib)
        # A new session: the daemons `ray start` leaves behind share its process group; stop() ends that group.
        proc = subprocess.Popen(cmd, env=head_env(temp_dir), start_new_session=True, stdout=out, stderr=out)
        rc = proc.wait(timeout=timeout_s)
        head = Head(port=port, dashboard_port=dashboard_port, temp_dir=temp_dir, pgid=proc.pid)
        (Path(temp_dir) / STATE).write_text(json.dumps(asdict(head)) + "\n")  # even on failure: stop cleans up
        if rc == 0:
            break
        stop(temp_dir)
        # `ray start` gives the raylet a fixed 30 s to register, too short on a loaded machine: try again
        if attempt == attempts:
            raise RuntimeError(f"`ray start` exited with {rc} ({attempts} attempts): {' '.join(cmd)}")
        print(f"`ray start` exited with {rc}; retrying ({attempt + 1}/{attempts})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    while not job_server_up(head):
        if time.monotonic() > deadline:
            stop(temp_dir)
            raise RuntimeError(f"job server at {head.job_address} did not come up within {timeout_s:.0f}s")
        time.sleep(1)
    return head


def job_server_up(head: Head) -> bool:
    req = urllib.request.Request(f"{head.job_address}/api/version",
                                 headers={"Authorization": f"Bearer {head.token()}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def read_state(temp_dir: str) -> Optional[Head]:
    path = Path(temp_dir) / STATE
    if not path.is_file():
        return None
    return Head(**json.loads(path.read_text()))


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                # fields after the command name (in parentheses): state, ppid, pgrp, ...
                state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
                if int(pgrp) == pgid and state != "Z":
                    pids.append(int(entry.name))
            except (OSError, ValueError):
                pass
    return pids


def _alive(head: Head) -> bool:
    """True if the recorded process group still holds a process of this head (guards against pgid reuse)."""
    for pid in _group_pids(head.pgid):
        try:
            if head.temp_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def stop(temp_dir: str, grace_s: float = 10.0) -> bool:
    """End the head recorded in temp_dir: SIGTERM its process group, SIGKILL what is left after grace_s.
    Returns False if no such head was running."""
    head = read_state(temp_dir)
    if head is None:
        return False
    if not _alive(head):
        (Path(temp_dir) / STATE).unlink(missing_ok=True)
        return False
    os.killpg(head.pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_pids(head.pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _group_pids(head.pgid):
        try:
            os.killpg(head.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _group_pids(head.pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    (Path(temp_dir) / STATE).unlink(missing_ok=True)
    return True


def status(temp_dir: str) -> int:
    head = read_state(temp_dir)
    if head is None or not _alive(head):
        print(f"no head running from {temp_dir}")
        return 1
    print(f"head: GCS {head.address}  job server {head.job_address} "
          f"({'up' if job_server_up(head) else 'not answering'})  temp dir {head.temp_dir}", flush=True)
    # right after start the autoscaler monitor may not have reported yet ("No cluster status"): wait for it
    for _ in range(15):
        r = subprocess.run([_ray_cli(), "status", f"--address={head.address}"], env=head_env(temp_dir),
                           capture_output=True, text=True)
        if r.returncode != 0 or "No cluster status" not in r.stdout:
            break
        time.sleep(2)
    print(r.stdout, end="", flush=True)
    print(r.stderr, end="", file=sys.stderr, flush=True)
    return r.returncode


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("start", help="start a local head node")
    s.add_argument("--dashboard-port", type=int, default=8265)
    s.add_argument("--num-cpus", type=int, default=None, help="logical CPUs (default: this machine's cores)")
    s.add_argument("--object-store-gib", type=float, default=None)
    for name, help_ in (("start", None), ("status", "show the head's resources"), ("stop", "stop the head")):
        sp = s if name == "start" else sub.add_parser(name, help=help_)
        sp.add_argument("--port", type=int, default=6379, help="GCS port; names the head")
        sp.add_argument("--temp-dir", default=None, help="default /tmp/ray-convformer-PORT")
    args = p.parse_args(argv)
    temp_dir = args.temp_dir or default_temp_dir(args.port)

    if args.action == "start":
        head = start(args.port, args.dashboard_port, temp_dir, args.num_cpus, args.object_store_gib)
        print(f"\nJob server: {head.job_address}   GCS: {head.address}   temp dir: {head.temp_dir}")
        print(f"  export RAY_JOB_TOKEN_FILE={token_path(head.temp_dir)}   # this head's token")
        print(f"  python -m cluster.submit --address {head.job_address} --config configs/smoke.yaml")
        print(f"  python -m cluster.local stop --port {head.port}")
        return 0
    if args.action == "status":
        return status(temp_dir)
    if stop(temp_dir):
        print(f"stopped the head from {temp_dir}")
        return 0
    print(f"no head running from {temp_dir}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
