"""The cluster definitions under deploy/ and the GPU lock: they parse, their entrypoints run real configs, their
resource requests fit their node types, GPU options go to GPU nodes only, the image installs the lock whose
torch / fbgemm-gpu / torchrec versions pair (docs/dependencies.md), and no config's loss buffer is unbounded."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from cluster.scaling import load_sweep_config, point_overrides
from trainer.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
# fbgemm-gpu release -> the torch release its binary is built against (a mismatch: undefined symbol at import)
FBGEMM_TORCH = {"1.7": "2.12", "1.8": "2.13", "1.9": "2.14"}
# Packages only the GPU image needs (not in cpu.lock): the CUDA runtime wheels PyPI's torch 2.13.0 pins, as pip
# resolved them (requirements/gpu.lock's last section). boto3, which the head's AWS autoscaler imports, is in
# cpu.lock too (the tests' S3 server, moto, brings it).
GPU_ONLY = {"cuda-bindings", "cuda-pathfinder", "cuda-toolkit", "nvidia-cublas", "nvidia-cuda-cupti",
            "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-cufile",
            "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-cusparselt-cu13", "nvidia-nccl-cu13",
            "nvidia-nvjitlink", "nvidia-nvshmem-cu13", "nvidia-nvtx", "triton"}
# The CUDA major each binary is built for, read from the PyPI wheels (docs/dependencies.md "The GPU stack"):
# torch's torch/version.py and its Requires-Dist cuda-toolkit==13.0.3; fbgemm-gpu's libraries' DT_NEEDED
# libcudart.so.13.
TORCH_CUDA = {"2.13.0": "13"}
FBGEMM_CUDA = {"1.8.0": "13"}

# The node types the manifests name. Source: AWS's EC2 instance-type pages (General purpose M5; Accelerated
# computing G5: g5.12xlarge = 4 x NVIDIA A10G 24 GiB).
NODE_TYPES = {
    "m5.2xlarge": {"cpu": 8, "memory_gib": 32, "gpu": 0},
    "g5.12xlarge": {"cpu": 48, "memory_gib": 192, "gpu": 4},
}
# What a Kubernetes pod can be granted is the node's allocatable capacity: capacity less kube-reserved,
# system-reserved, the eviction threshold and the node's daemon pods (EKS AMI: about 255 MiB + 11 MiB per
# allowed pod of memory, a fraction of a CPU, plus aws-node, kube-proxy, the NVIDIA device plugin). Requests
# must leave at least this much of the node free.
RESERVE_CPU = 1.0
RESERVE_MEMORY = lambda gib: max(4.0, 0.1 * gib)  # noqa: E731
# the worst-case fp32 loss-logit buffer of any config (tests below): rows x columns x 4 bytes
LOSS_BUFFER_BOUND = 2 * 1024**3


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
    assert not any("--gpus" in o for o in cluster["docker"]["run_options"])  # run_options reach the CPU head too
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
    assert {k: v for k, v in gpu.items() if k != "fbgemm-gpu" and k not in GPU_ONLY} == {
        k: v for k, v in cpu.items() if k != "fbgemm-gpu-cpu"}
    assert GPU_ONLY <= gpu.keys() and not GPU_ONLY & cpu.keys()  # the extras are listed, and only GPU-side
    # one CUDA major for torch, fbgemm-gpu and the runtime wheels
    cuda = TORCH_CUDA[gpu["torch"]]
    assert FBGEMM_CUDA[gpu["fbgemm-gpu"]] == cuda
    assert gpu["cuda-toolkit"].split(".")[0] == gpu["nvidia-cuda-runtime"].split(".")[0] == cuda
    assert all(name.endswith(f"-cu{cuda}") for name in GPU_ONLY if re.search(r"-cu\d+$", name))
    assert "boto3" in gpu  # the autoscaler's
    top = pins_in(REPO / "requirements" / "gpu.in")
    for name in ("torch", "fbgemm-gpu", "torchrec", "ray", "deepspeed", "pyarrow", "boto3"):
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
    # every wheel from the lock, --no-deps: the only pip install (no second source of versions)
    assert re.findall(r"pip install[^\n&]*", text) == [f"pip install --no-deps -r {dest} \\"]
    assert not re.search(r"(torch|fbgemm-gpu|torchrec|ray)[=<>~]=\s*\d", text), "a version pinned outside the lock"
    assert "assert torch.version.cuda" in text  # the build fails if a CPU torch slipped in
    apt = re.search(r"apt-get install[^&]*", text, re.S).group(0).split()
    for tool in ("rsync", "openssh-client", "sudo"):  # ray up rsyncs and runs sudo; the autoscaler uses ssh
        assert tool in apt, tool
    imported = re.search(r'python -c "import ([^;]+);', text).group(1)
    assert "boto3" in imported
    # fbgemm_gpu needs the NVIDIA driver's libnvidia-ml.so.1 at import: a GPU-less builder would fail on it
    assert "fbgemm_gpu" not in imported and "torchrec" not in imported
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "runs" in ignore and ".git" in ignore


# ---------------------------------------------------------------- resources against node types


def _quantity(q: str) -> float:
    """A Kubernetes quantity -> CPUs or GiB."""
    q = str(q)
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0, "G": 1e9 / 1024**3, "M": 1e6 / 1024**3, "m": 1e-3}
    for unit, scale in units.items():
        if q.endswith(unit):
            return float(q[: -len(unit)]) * scale
    return float(q)


def _pods():
    """(name, node type, pod spec, replicas) of every pod group of the RayJob."""
    spec = yaml.safe_load((DEPLOY / "kuberay-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"], 1)]
    groups += [(g["groupName"], g, g["replicas"]) for g in spec["workerGroupSpecs"]]
    for name, group, replicas in groups:
        pod = group["template"]["spec"]
        yield name, pod["nodeSelector"]["node.kubernetes.io/instance-type"], pod, replicas


def test_kuberay_requests_fit_their_node_types():
    job = yaml.safe_load((DEPLOY / "kuberay-rayjob.yaml").read_text())
    args = shlex.split(job["spec"]["entrypoint"])
    config = args[args.index("--config") + 1]
    cfg = load_config(REPO / config, [a for a in args[3:] if not a.startswith("--") and a != config])
    for name, node_type, pod, replicas in _pods():
        node = NODE_TYPES[node_type]
        (container,) = pod["containers"]
        res = container["resources"]
        assert res["requests"] == res["limits"], name  # Guaranteed QoS: never evicted for memory pressure first
        cpu, mem = _quantity(res["requests"]["cpu"]), _quantity(res["requests"]["memory"])
        assert cpu <= node["cpu"] - RESERVE_CPU, (name, cpu, node)
        assert mem <= node["memory_gib"] - RESERVE_MEMORY(node["memory_gib"]), (name, mem, node)
        gpus = int(res["requests"].get("nvidia.com/gpu", 0))
        assert gpus <= node["gpu"], (name, gpus, node)
        # a memory-backed emptyDir (/dev/shm) is charged to the container's memory limit
        shm = sum(_quantity(v["emptyDir"].get("sizeLimit", "0")) for v in pod.get("volumes", [])
                  if v.get("emptyDir", {}).get("medium") == "Memory")
        assert shm < mem, (name, shm, mem)
        if gpus:  # one training worker per GPU: their CPU shares fit the pod
            assert gpus * cfg.distributed.cpus_per_worker <= cpu, name
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def _launcher():
    return yaml.safe_load((DEPLOY / "cluster-gpu.yaml").read_text())


def test_cluster_launcher_yaml_is_valid_for_ray():
    """Ray's own schema (ray up validates against it): a misplaced docker key fails here, not at `ray up`."""
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_launcher(), schema)


def test_cluster_launcher_gpu_options_only_on_gpu_nodes_and_fit():
    cluster = _launcher()
    docker = cluster["docker"]
    everywhere = docker.get("run_options", []) + docker.get("head_run_options", [])
    assert not any("--gpus" in o or "nvidia" in o for o in everywhere), everywhere  # the head is a CPU node
    head = cluster["head_node_type"]
    gpu_types = 0
    for name, node_type in cluster["available_node_types"].items():
        node = NODE_TYPES[node_type["node_config"]["InstanceType"]]
        ami = node_type["node_config"]["ImageId"]
        assert ami != "latest_dlami" and (ami.startswith("ami-") or ami.startswith("resolve:ssm:/aws/service/")), ami
        if "ubuntu" in ami:
            assert "18.04" not in ami and "20.04" not in ami, ami  # drivers too old for torch 2.13's CUDA
        options = node_type.get("docker", {}).get("worker_run_options", [])
        if name == head:
            assert not options  # worker options never apply to the head; keep it that way
        if node["gpu"]:
            gpu_types += 1
            assert "--gpus all" in options, name
        else:
            assert not any("--gpus" in o for o in options), name
        for o in everywhere + options:  # /dev/shm within the node's memory
            if o.startswith("--shm-size="):
                size = o.split("=", 1)[1]
                gib = float(size[:-1]) * {"g": 1, "m": 1 / 1024}[size[-1].lower()]
                assert gib <= node["memory_gib"] / 2, (name, o)
        declared = node_type.get("resources", {})
        assert declared.get("CPU", 0) <= node["cpu"] and declared.get("GPU", 0) <= node["gpu"], name
        assert node_type.get("max_workers", 0) <= cluster["max_workers"] or name == head
    assert gpu_types >= 1
    # the job the header submits (8 workers, one GPU each) fits the GPU nodes the cluster keeps
    text = (DEPLOY / "cluster-gpu.yaml").read_text()
    wanted = max(int(n) for n in re.findall(r"distributed\.num_workers=(\d+)", text))
    gpus = sum(NODE_TYPES[t["node_config"]["InstanceType"]]["gpu"] * t.get("max_workers", 0)
               for t in cluster["available_node_types"].values())
    assert wanted <= gpus


# ---------------------------------------------------------------- loss buffers


def loss_logit_bytes(cfg: Config) -> int:
    """The largest fp32 logit buffer the loss builds in one step: rows x columns x 4 bytes.

    Rows: every position of the batch for positions=all (B*L, padding included: the loss works on static shapes),
    the last one for positions=last (B). Columns: the positive, the shared negatives and, with in-batch negatives,
    every row's positive (an N x N block); bce / bpr score one positive and one negative per row.
    """
    t = cfg.training
    rows = t.batch_size * (cfg.model.max_seq_len if t.positions == "all" else 1)
    if t.loss.type == "sampled_softmax":
        cols = 1 + t.loss.num_negatives + (rows if t.loss.in_batch_negatives else 0)
    elif t.loss.type == "full_softmax":  # every item; a config leaving num_items to the data counts it as 0
        cols = 1 + cfg.model.num_items
    else:
        cols = 2
    return rows * cols * 4


def _all_configs():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if "scaling" in path.parts:
            sweep_cfg = load_sweep_config(path)
            for sweep in sweep_cfg.sweeps:
                for values in sweep.points():
                    label = f"{path.relative_to(REPO)}:{sweep.name}:{values}"
                    yield label, load_config(REPO / sweep_cfg.base, point_overrides(sweep_cfg, sweep, values))
        else:
            yield str(path.relative_to(REPO)), load_config(path)


def test_every_config_bounds_its_loss_buffer():
    sizes = dict(_all_configs())
    assert "configs/long-sequence.yaml" in sizes and len(sizes) > 10
    over = {name: f"{loss_logit_bytes(cfg) / 1024**3:.2f} GiB" for name, cfg in sizes.items()
            if loss_logit_bytes(cfg) > LOSS_BUFFER_BOUND}
    assert not over, f"loss logits over {LOSS_BUFFER_BOUND / 1024**3:.0f} GiB: {over}"


def test_loss_buffer_formula_catches_the_old_long_sequence_config():
    old = load_config(REPO / "configs" / "long-sequence.yaml", ["training.loss.in_batch_negatives=true"])
    assert loss_logit_bytes(old) == 16 * 2048 * (1 + 1024 + 16 * 2048) * 4 > LOSS_BUFFER_BOUND


@pytest.mark.parametrize("path", ["configs/long-sequence.yaml"])
def test_long_sequence_users_fill_their_windows(path):
    cfg = load_config(REPO / path)
    assert cfg.data.synth.events_per_user >= cfg.model.max_seq_len  # not 95% padding


# ---------------------------------------------------------------- the head without a GPU driver

HEAD_MODULES = ["trainer.train", "trainer.driver.launch", "trainer.driver.console", "trainer.worker.entry",
                "cluster.submit", "cluster.local", "cluster.scaling", "trainer.recommend", "data.ingest"]


@pytest.mark.cli
def test_the_driver_side_never_imports_torchrec_or_fbgemm():
    """The CUDA fbgemm_gpu (hence torchrec) loads the NVIDIA driver's libnvidia-ml.so.1 at import, which a CPU
    head does not have. So everything that runs on the head (the job's driver, submit, the Ray Train
    controller naming the worker function) must work with both unimportable; a config error still gets its
    one line and exit status 2 there."""
    import subprocess
    import sys

    block = "import sys\nfor m in ('torchrec', 'fbgemm_gpu'):\n    sys.modules[m] = None\n"
    code = block + "".join(f"import {m}\n" for m in HEAD_MODULES) + (
        "import runpy\nsys.argv = ['trainer.train', '--config', 'configs/smoke.yaml', 'model.no_such_key=1']\n"
        "runpy.run_module('trainer.train', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no_such_key" in out.stderr and "torchrec" not in out.stderr and "fbgemm" not in out.stderr
