"""Static checks of the deployment configs: cluster.yaml (Ray cluster launcher) and
deploy/kuberay-*.yaml (KubeRay RayJobs). No network, no cluster: Ray's own config checks
(the ones `ray up` runs before it calls the cloud), and that each job's entrypoint runs a script
of this repository with flags its parser accepts.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from leukray.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
KUBERAY_FILES = sorted((ROOT / "deploy").glob("kuberay-*.yaml"))

# Flags whose value leukray opens as a local path on every node (not a URI): they must live on
# storage all nodes share. (`train --output`, `score --model/--input/--output` and `evaluate
# --model` may be s3://... URIs.) Update this when leukray learns to read a flag's value
# through pyarrow filesystems.
LOCAL_PATH_FLAGS = {"train": ("data",), "evaluate": ("data",)}


def ray_image_version(image: str) -> str | None:
    """'rayproject/ray:2.60.0-py311-gpu' -> '2.60.0'; None for images that are not rayproject/ray*."""
    m = re.fullmatch(r"rayproject/ray(?:-ml|-llm)?:(\d+\.\d+\.\d+)(?:-.*)?", image)
    return m.group(1) if m else None


def python_tag_ok(image: str) -> bool:
    m = re.search(r"-py3(\d+)", image)
    return m is None or int(m.group(1)) >= 10  # pyproject: requires-python >= 3.10


# --------------------------------------------------------------------------- cluster.yaml

@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before it talks to the cloud provider
    (ray.autoscaler._private.commands._bootstrap_config): merge the provider's defaults, then
    validate against ray/autoscaler/ray-schema.json plus Ray's extra rules. The file as written
    is checked against the schema first too (`ray up` would otherwise fail on some mistakes with
    a TypeError while merging, before its validation)."""
    import json

    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_schema(cluster_config):
    ray_up_checks(cluster_config)


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c.update(max_workers="four"), jsonschema.ValidationError),
    (lambda c: c.update(idle_timeout_minutes=[10]), jsonschema.ValidationError),
    (lambda c: c.update(setup_commands="pip install leukray"), jsonschema.ValidationError),
    (lambda c: c.update(max_worker=4), jsonschema.ValidationError),  # misspelt key
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="0"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["cpu_worker"].pop("node_config"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="no_such_type"), ValueError),
    (lambda c: c.update(max_workers=0) or c["available_node_types"]["gpu_worker"].update(min_workers=1), ValueError),
], ids=["max_workers-str", "idle-list", "setup-str", "unknown-key", "min_workers-str", "fractional-gpu",
        "no-node_config", "unknown-head-type", "min-over-max"])
def test_a_broken_copy_is_rejected(cluster_config, break_it, error):
    """The validation used above does catch mistakes (so a pass means something)."""
    broken = copy.deepcopy(cluster_config)
    break_it(broken)
    with pytest.raises(error):
        ray_up_checks(broken)


def test_cluster_node_types(cluster_config):
    types = cluster_config["available_node_types"]
    head = cluster_config["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not one of {sorted(types)}"
    assert types[head]["resources"].get("CPU") == 0, "nothing should be scheduled on the head"
    workers = {name: t for name, t in types.items() if name != head}
    gpu = [n for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [n for n, t in workers.items() if not t["resources"].get("GPU") and t["resources"].get("CPU", 0) >= 1]
    assert gpu and cpu, f"want a GPU worker type (training) and a CPU worker type (scoring): {workers}"
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], name
        assert t["node_config"].get("InstanceType"), name
    assert sum(t["max_workers"] for t in workers.values()) <= cluster_config["max_workers"]


def test_cluster_images_match_installed_ray(cluster_config):
    docker = cluster_config.get("docker") or {}
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    images += [(t.get("docker") or {}).get("worker_image") for t in cluster_config["available_node_types"].values()]
    images = [i for i in images if i]
    assert images, "no docker image: pin rayproject/ray:<version> so nodes run the same Ray as the client"
    for image in images:
        assert ray_image_version(image) == ray.__version__, f"{image}: Ray here is {ray.__version__}"
        assert python_tag_ok(image), image


def test_every_node_installs_leukray(cluster_config):
    prepared = ray_up_checks(cluster_config)
    head = prepared["head_node_type"]
    for name, t in prepared["available_node_types"].items():
        # A node type's own worker_setup_commands replace the global setup + worker setup commands.
        commands = prepared["head_setup_commands"] if name == head else \
            t.get("worker_setup_commands", prepared["worker_setup_commands"])
        assert any("leukray" in c for c in commands), f"{name}: setup commands never install leukray: {commands}"


def test_cluster_head_is_private_and_authenticated(cluster_config):
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    worker_start = " ".join(cluster_config["worker_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard/job API must not listen on public interfaces"
    assert "0.0.0.0" not in head_start
    for cmds in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in cmds
    assert "~/.ray/auth_token" in cluster_config.get("file_mounts", {}), "the auth token must reach every node"


# --------------------------------------------------------------------------- KubeRay

def rayjobs() -> list[tuple[str, dict]]:
    jobs = []
    for path in KUBERAY_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayJob":
                jobs.append((f"{path.name}:{doc['metadata']['name']}", doc))
    return jobs


RAYJOBS = rayjobs()


def containers(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def entrypoint_args(spec: dict):
    """(script, leukray command, parsed args) of `python jobs/<command>.py FLAGS...`."""
    argv = shlex.split(spec["entrypoint"])
    assert Path(argv[0]).name.startswith("python"), argv
    script = argv[1]
    assert (ROOT / script).is_file(), f"{script} is not in the repository"
    command = Path(script).stem  # jobs/train.py forwards its argv to `leukray train`
    try:
        args = _parser().parse_args([command, *argv[2:]])
    except SystemExit as e:
        pytest.fail(f"`leukray {command}` rejects the entrypoint's flags {argv[2:]} (exit {e.code})")
    return script, command, args


def test_kuberay_manifests_exist():
    assert (ROOT / "deploy" / "kuberay-rayjob.yaml") in KUBERAY_FILES
    assert any(doc["spec"]["entrypoint"].split()[1] == "jobs/train.py" for _, doc in RAYJOBS)


@pytest.mark.parametrize("name, job", RAYJOBS, ids=[n for n, _ in RAYJOBS])
def test_rayjob_shape(name, job):
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster.get("authOptions", {}).get("mode") == "token"
    assert str(cluster["headGroupSpec"]["rayStartParams"].get("num-cpus")) == "0"
    for group in cluster["workerGroupSpecs"]:
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", group["replicas"])


@pytest.mark.parametrize("name, job", RAYJOBS, ids=[n for n, _ in RAYJOBS])
def test_rayjob_entrypoint_runs_a_repo_script_with_valid_flags(name, job):
    script, command, args = entrypoint_args(job["spec"])
    assert script.startswith("jobs/") and args.command == command


@pytest.mark.parametrize("name, job", RAYJOBS, ids=[n for n, _ in RAYJOBS])
def test_rayjob_images_match_installed_ray(name, job):
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    for c in containers(spec):
        # Custom images (with leukray baked in) are fine; stock Ray images must be this Ray.
        version = ray_image_version(c["image"])
        if version is not None:
            assert version == ray.__version__, f"{c['image']}: Ray here is {ray.__version__}"
        assert python_tag_ok(c["image"]), c["image"]


@pytest.mark.parametrize("name, job", RAYJOBS, ids=[n for n, _ in RAYJOBS])
def test_rayjob_paths_are_on_a_volume_every_pod_mounts(name, job):
    """leukray opens these flags' values as local paths from the driver and from workers/actors, so
    they must be absolute paths on a volume mounted at the same place in every pod."""
    spec = job["spec"]
    _, command, args = entrypoint_args(spec)
    mounts_per_container = [{m["mountPath"] for m in c.get("volumeMounts", [])} for c in containers(spec)]
    for flag in LOCAL_PATH_FLAGS.get(command, ()):
        value = getattr(args, flag, None)
        if not value:
            continue
        assert "://" not in value, f"--{flag} {value}: leukray {command} reads it as a local path"
        assert value.startswith("/"), f"--{flag} {value}: relative paths land in the job's temporary working_dir"
        for mounts in mounts_per_container:
            assert any(value == m or value.startswith(m.rstrip("/") + "/") for m in mounts), \
                f"--{flag} {value} is not under a volume mounted in every pod ({mounts})"


@pytest.mark.parametrize("name, job", RAYJOBS, ids=[n for n, _ in RAYJOBS])
def test_rayjob_has_the_gpus_it_asks_for(name, job):
    spec = job["spec"]
    _, command, args = entrypoint_args(spec)
    if not getattr(args, "gpu", False):
        return
    gpus = 0
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        per_pod = sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                      for c in group["template"]["spec"]["containers"])
        gpus += per_pod * group.get("maxReplicas", group["replicas"])
    wanted = args.workers if command == "train" else (args.actors or 1)
    assert gpus >= wanted, f"--gpu with {wanted} worker(s)/actor(s) but the worker groups have {gpus} GPU(s)"
