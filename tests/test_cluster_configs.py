"""The cluster configs parse, ask for what the job needs, and start entry points that exist with valid arguments."""

import os
import shlex

import pytest
import yaml

from aidetect_batch.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
JOB_VERBS = {"scan.py": "scan", "train.py": "train", "evaluate.py": "evaluate", "prune.py": "prune"}


def load(relative: str) -> dict:
    with open(os.path.join(CLUSTER, relative)) as handle:
        return yaml.safe_load(handle)


def gpu_limit(group: dict) -> int:
    containers = group["template"]["spec"]["containers"]
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers)


def check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no tasks on the head: it runs the driver and the writer"
    assert gpu_limit(head) == 0
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert gpu_limit(groups["gpu"]) == 1 and groups["gpu"]["maxReplicas"] >= 1
    assert gpu_limit(groups["cpu-decode"]) == 0 and groups["cpu-decode"]["maxReplicas"] > groups["gpu"]["maxReplicas"]
    for group in [head, *groups.values()]:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] and container["resources"]["limits"]["memory"]
            assert "env" not in container or not any("SECRET" in e["name"] for e in container["env"])
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def check_entrypoint(entrypoint: str) -> str:
    words = shlex.split(entrypoint)
    assert words[0] == "python" and words[1].startswith("jobs/")
    assert os.path.isfile(os.path.join(ROOT, words[1])), f"{words[1]} does not exist"
    verb = JOB_VERBS[os.path.basename(words[1])]
    build_parser().parse_args([verb, *words[2:]])
    return verb


def test_aws_launcher_config():
    config = load("aws.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands"):
        assert key in config
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_groups = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    cpu_groups = [
        n for n, t in types.items() if n != config["head_node_type"] and not t.get("resources", {}).get("GPU")
    ]
    assert gpu_groups and cpu_groups, "a GPU group for the Classifier and a CPU group for decoding"
    for name, node in types.items():
        if name != config["head_node_type"]:
            assert node["min_workers"] <= node["max_workers"] <= config["max_workers"]
    assert any("aidetect-batch" in c for c in config["setup_commands"]), "the package is installed on every node"
    assert "AWS_SECRET_ACCESS_KEY" not in yaml.safe_dump(config)


def test_kuberay_raycluster():
    manifest = load("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    check_ray_cluster_spec(manifest["spec"])


@pytest.mark.parametrize(
    ("name", "verb"), [("kuberay/rayjob-scan.yaml", "scan"), ("kuberay/rayjob-train.yaml", "train")]
)
def test_kuberay_rayjobs(name, verb):
    manifest = load(name)
    assert manifest["kind"] == "RayJob" and manifest["spec"]["shutdownAfterJobFinishes"] is True
    assert check_entrypoint(manifest["spec"]["entrypoint"]) == verb
    check_ray_cluster_spec(manifest["spec"]["rayClusterSpec"])
