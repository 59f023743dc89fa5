"""The local Ray instances the project starts listen on loopback only: the trainer's, and the one a data
stage starts on its own (both through data.ray_utils.ensure_ray)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

STARTS = {
    "trainer": """
from trainer.config import load_config
from trainer.driver.launch import connect_ray
connect_ray(load_config("configs/smoke.yaml", ["distributed.num_workers=1"]))
""",
    "data stage": """
import tempfile
from data.sequences import build_sequences
from tests.helpers import write_log
tmp = tempfile.mkdtemp()
log = write_log(tmp + "/log", [(1, 2, "2026-01-01 00:00:01"), (1, 3, "2026-01-02 00:00:01")])
build_sequences(log, tmp + "/seq", backend="ray")
""",
}

# In a fresh interpreter (the pytest session may already hold a Ray instance, which would be reused): each
# start in turn gets a new local instance, whose processes' listening sockets are read while it runs.
PROBE = """
import json, psutil, ray

def report(who):
    procs = psutil.Process().children(recursive=True) + [psutil.Process()]
    listening = set()
    for p in procs:
        try:
            listening |= {c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    print("PROBE " + json.dumps({"who": who, "node": ray.nodes()[0]["NodeManagerAddress"],
                                 "listening": sorted(listening), "processes": len(procs)}), flush=True)
    ray.shutdown()
""" + "".join(f"{code}\nreport({who!r})\n" for who, code in STARTS.items())


@pytest.mark.cli
def test_local_ray_instances_listen_on_loopback_only():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    probes = [json.loads(x[len("PROBE "):]) for x in out.stdout.splitlines() if x.startswith("PROBE ")]
    assert [p["who"] for p in probes] == list(STARTS), out.stdout + out.stderr
    for probe in probes:
        assert probe["node"] == "127.0.0.1", probe
        assert probe["processes"] > 2 and probe["listening"], probe  # GCS, raylet... were found and do listen
        assert set(probe["listening"]) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, probe
