"""deploy/: the cluster manifests parse and carry the fields their tools require."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert len(groups) >= 2
    for group in groups:
        pod = group["template"]
        (container,) = _containers(pod)
        assert container["image"]
        assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]
        assert {"secretRef": {"name": "ead-dist-s3", "optional": True}} in container["envFrom"]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    ports = {p["containerPort"] for p in _containers(spec["headGroupSpec"]["template"])[0]["ports"]}
    assert {6379, 8265, 10001} <= ports
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_raycluster():
    (doc,) = _documents("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob():
    (doc,) = _documents("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m ead_dist.cli run pipelines/cifar10_ipc10.yaml")
    assert (DEPLOY.parent / "pipelines" / "cifar10_ipc10.yaml").is_file()
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_cluster_launcher_config():
    (doc,) = _documents("cluster.yaml")
    assert doc["cluster_name"] and doc["provider"]["type"] == "aws"
    assert doc["head_node_type"] in doc["available_node_types"]
    assert len(doc["available_node_types"]) >= 3  # head, CPU workers, GPU workers
    assert any("pip install -e ~/ead-dist" in c for c in doc["setup_commands"])


def test_cluster_launcher_config_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema_file = resources.files("ray.autoscaler") / "ray-schema.json"
    if not schema_file.is_file():
        pytest.skip("this Ray ships no ray-schema.json")
    (doc,) = _documents("cluster.yaml")
    jsonschema.validate(doc, json.loads(schema_file.read_text()))


def test_dockerfile_pins_torch_and_installs_the_project():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text and "ray[default" in text
    assert "pip install --no-cache-dir ." in text
    assert "ENTRYPOINT [" not in text and "\nCMD" not in text
