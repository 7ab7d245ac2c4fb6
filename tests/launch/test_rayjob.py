"""`plait launch --emit rayjob`: a KubeRay RayJob that KubeRay's published CRD schema accepts, whose pods
have their resources, plait's wheel and its dependencies, and a runs folder that every pod reaches. It is
written offline: the storage URI given is not contacted."""
import base64
import gzip
import io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
CRD = Path(__file__).parents[1] / "data" / "kuberay" / "ray.io_rayjobs.yaml.gz"  # KubeRay v1.7.0, see SOURCE.md
PLAIT = [sys.executable, "-m", "plait.launch.cli"]
BUCKET = "s3://plait-no-such-bucket/runs"  # nothing here can reach it: emitting must not try


def rayjob_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def config_file(tmp_path: Path) -> Path:
    from conftest import TINY_PLUGINS

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "k8s_job", "epochs": 1, "runs_dir": str(tmp_path / "runs")},
                                    "scaling": {"num_workers": 2}, "plugins": TINY_PLUGINS}, sort_keys=False))
    return path


def emit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PLAIT, "launch", str(config_file(tmp_path)), "--emit", "rayjob", *args],
                          capture_output=True, text=True, timeout=300)


def test_the_rayjob_passes_kuberays_schema_with_resources_wheel_and_storage(tmp_path):
    import jsonschema

    started = time.monotonic()
    result = emit(tmp_path, "--image", "registry.example/plait-deps:1", f"run.runs_dir={BUCKET}",
                  "scaling.resources_per_worker={CPU: 2, memory: 8589934592}")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 120
    assert "&id" not in result.stdout and "*id" not in result.stdout, "no YAML anchors or aliases"
    files, job = yaml.safe_load_all(result.stdout)
    jsonschema.validate(job, rayjob_schema())  # what the API server checks on `kubectl apply`

    assert yaml.safe_load(files["data"]["config.yaml"])["run"]["runs_dir"] == BUCKET  # as given
    wheel_name, wheel = next(iter(files["binaryData"].items()))
    assert len(wheel) < 1_000_000, "a ConfigMap holds at most 1 MiB"
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(wheel))) as archive:
        assert "plait/core/hookspecs.py" in archive.namelist()
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["pip"] == [f"/plait/{wheel_name}"]  # the image has the dependencies: plait alone
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}  # the workers' CPUs are the workers'
    group = cluster["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    for pod in (cluster["headGroupSpec"], group):
        container = pod["template"]["spec"]["containers"][0]
        assert container["image"] == "registry.example/plait-deps:1"
        assert container["volumeMounts"] == [{"name": "plait", "mountPath": "/plait"}]
        assert container["resources"]["requests"] == container["resources"]["limits"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}


def test_pip_deps_pins_plaits_dependencies_on_rays_image_and_elastic_ranges_scale_pods(tmp_path):
    from importlib.metadata import version

    import jsonschema

    result = emit(tmp_path, "--pip-deps", f"run.runs_dir={BUCKET}", "scaling.num_workers=[1,3]",
                  "scaling.use_gpu=true")
    assert result.returncode == 0, result.stderr
    _, job = yaml.safe_load_all(result.stdout)
    jsonschema.validate(job, rayjob_schema())
    pip = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["pip"]
    assert pip[0].startswith("/plait/plait-") and pip[0].endswith(".whl")
    assert f"torch=={version('torch')}" in pip and "ray[default,train]==2.60.0" in pip
    assert all("==" in p for p in pip[1:]), "every dependency pinned"
    cluster = job["spec"]["rayClusterSpec"]
    group = cluster["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 3) and cluster["enableInTreeAutoscaling"] is True
    container = group["template"]["spec"]["containers"][0]
    assert container["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "4Gi", "nvidia.com/gpu": "1"}


@pytest.mark.parametrize("args, expected", [
    ((f"run.runs_dir={BUCKET}",), (r"--emit rayjob: name the image with --image IMAGE \(one that provides torch "
                                   r"and plait's dependencies\), or use --pip-deps")),
    (("--pip-deps",), r"run.runs_dir: .* is a folder on this machine, which the RayJob's 3 pods .* use a storage URI"),
])
def test_what_cannot_run_on_a_cluster_is_one_line(tmp_path, args, expected):
    import re

    result = emit(tmp_path, *args)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), result.stderr
