"""The cluster definitions under deploy/ and the GPU lock: they parse, their entrypoints run real configs, and
the image installs the lock whose torch / fbgemm-gpu / torchrec versions pair (docs/dependencies.md)."""

import re
import shlex
from pathlib import Path

import yaml

from trainer.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
# fbgemm-gpu release -> the torch release its binary is built against (a mismatch: undefined symbol at import)
FBGEMM_TORCH = {"1.7": "2.12", "1.8": "2.13", "1.9": "2.14"}


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: unpinned line {line!r}"
            out[name.lower().replace("_", "-")] = version
    return out


def minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_kuberay_rayjob_runs_a_real_config_on_gpu_workers():
    job = yaml.safe_load((DEPLOY / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "trainer.train"]
    config = args[args.index("--config") + 1]
    overrides = [a for a in args[3:] if not a.startswith("--") and a != config]
    cfg = load_config(REPO / config, overrides)  # the config exists and the overrides are valid
    assert cfg.distributed.use_gpu is True and cfg.output.dir.startswith("/mnt/runs/")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == pins(REPO / "requirements" / "gpu.lock")["ray"]
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"].endswith("convformer-trainer:gpu")
        gpus += int(container["resources"]["limits"]["nvidia.com/gpu"]) * group["replicas"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/mnt/runs" in mounts  # output.dir is on storage every node shares
    assert gpus >= cfg.distributed.num_workers  # one GPU per training worker
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].endswith("convformer-trainer:gpu")


def test_cluster_launcher_yaml_names_real_configs_and_the_image():
    text = (DEPLOY / "cluster-gpu.yaml").read_text()
    cluster = yaml.safe_load(text)
    assert cluster["docker"]["image"].endswith("convformer-trainer:gpu")
    assert "--gpus all" in cluster["docker"]["run_options"]
    assert cluster["head_node_type"] in cluster["available_node_types"]
    for cmd in cluster["head_start_ray_commands"]:
        if "--dashboard-host" in cmd:
            assert "--dashboard-host=127.0.0.1" in cmd  # reached through `ray dashboard`'s tunnel only
    configs = re.findall(r"configs/[\w/.-]+\.yaml", text)
    assert configs
    for c in configs:
        assert (REPO / c).is_file(), c


def test_gpu_lock_pairs_torch_fbgemm_torchrec_and_matches_the_cpu_lock():
    gpu, cpu = pins(REPO / "requirements" / "gpu.lock"), pins(REPO / "requirements" / "cpu.lock")
    assert "fbgemm-gpu-cpu" not in gpu, "the GPU lock must carry the CUDA fbgemm-gpu, not the CPU build"
    assert FBGEMM_TORCH[minor(gpu["fbgemm-gpu"])] == minor(gpu["torch"])
    assert minor(gpu["torchrec"]) == minor(gpu["fbgemm-gpu"])
    # same release train as the CPU lock, and every other pin identical
    assert gpu["torch"] == cpu["torch"] and gpu["torchrec"] == cpu["torchrec"]
    assert gpu["fbgemm-gpu"] == cpu["fbgemm-gpu-cpu"]
    assert {k: v for k, v in gpu.items() if k != "fbgemm-gpu"} == {
        k: v for k, v in cpu.items() if k != "fbgemm-gpu-cpu"}
    top = pins_in(REPO / "requirements" / "gpu.in")
    for name in ("torch", "fbgemm-gpu", "torchrec", "ray", "deepspeed", "pyarrow"):
        assert top[name] == gpu[name], name


def pins_in(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s#*]+)\s*$", line.split("#")[0].strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_dockerfile_installs_the_gpu_lock():
    docker = (DEPLOY / "Dockerfile").read_text()
    steps = [line for line in docker.splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(steps)
    assert re.search(r"^COPY requirements/gpu\.lock (\S+)$", text, re.M)
    dest = re.search(r"^COPY requirements/gpu\.lock (\S+)$", text, re.M).group(1)
    # torch and fbgemm-gpu are taken from the lock (no second source of versions), the rest installed --no-deps
    assert f"grep -E '^torch==' {dest}" in text and f"grep -E '^fbgemm-gpu==' {dest}" in text
    assert f"pip install --no-deps -r {dest}" in text
    assert not re.search(r"(torch|fbgemm-gpu|torchrec|ray)[=<>~]=\s*\d", text), "a version pinned outside the lock"
    assert "assert torch.version.cuda" in text  # the build fails if a CPU torch slipped in
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "runs" in ignore and ".git" in ignore
