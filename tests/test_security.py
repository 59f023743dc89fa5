"""The trainer's own local Ray instance listens on loopback only (issue #6, security)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# In a fresh interpreter: the pytest session may already hold a Ray instance, which connect_ray would reuse.
PROBE = """
import json, psutil, ray
from trainer.config import load_config
from trainer.launch import connect_ray

connect_ray(load_config("configs/smoke.yaml", ["distributed.num_workers=1"]))
procs = psutil.Process().children(recursive=True) + [psutil.Process()]
listening = set()
for p in procs:
    try:
        listening |= {c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    except psutil.NoSuchProcess:
        pass
print("PROBE " + json.dumps({"node": ray.nodes()[0]["NodeManagerAddress"], "listening": sorted(listening),
                             "processes": len(procs)}))
ray.shutdown()
"""


def test_local_ray_instance_listens_on_loopback_only():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line, out.stdout + out.stderr
    probe = json.loads(line[len("PROBE "):])
    assert probe["node"] == "127.0.0.1"
    assert probe["processes"] > 2 and probe["listening"], probe  # GCS, raylet... were found and do listen
    assert set(probe["listening"]) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, probe
