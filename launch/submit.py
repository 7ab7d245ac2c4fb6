"""``plait launch``: run a config as a Ray job on a cluster, or emit a KubeRay RayJob.

The job's runtime env carries a freshly built wheel of plait (``py_modules``), the resolved
config (``working_dir``) and what plugins add through ``plait_runtime_env``. The cluster's
Python needs plait's dependencies (torch, transformers, timm, ...). Resubmitting the same
run name resumes it, from the run folder on the cluster.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

from plait.core import __version__, hookspecs
from plait.core.config import PlaitConfig
from plait.core.errors import ConfigError, PlaitError
from plait.core.manager import Plugins
from plait.launch.ray_runner import check_reachable
from plait.launch.storage import is_uri

TOKEN_FILE = Path.home() / ".ray" / "auth_token"
ENTRYPOINT = "python -m plait.launch.cli train config.yaml"


def auth_headers() -> dict[str, str]:
    """Bearer token for a cluster with token authentication, found where Ray looks for it:
    $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. Sent, never printed."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]) if os.environ.get("RAY_AUTH_TOKEN_PATH") else TOKEN_FILE
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.WARNING)  # no "Uploading package ..." lines
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("plait launch needs --address http://HOST:8265 (or $RAY_ADDRESS)")
    check_reachable(address)
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # noqa: BLE001 - connection and authentication errors, without the token
        raise ConfigError(f"cannot use the Ray job server at {address}: {type(exc).__name__}: {exc}") from None


def job_config(config: PlaitConfig) -> dict[str, Any]:
    """The resolved config as the job runs it: a runs folder made absolute (the job's own
    working folder is temporary); a storage URI as it is."""
    resolved = config.to_dict()
    if not is_uri(resolved["run"]["runs_dir"]):
        resolved["run"]["runs_dir"] = str(Path(resolved["run"]["runs_dir"]).resolve())
    return resolved


def merge_runtime_envs(fragments: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for fragment in fragments:
        for key, value in (fragment or {}).items():
            if isinstance(value, list):
                merged[key] = [*merged.get(key, []), *value]
            elif isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    return merged


def source_root() -> Path | None:
    """The plait source tree when running from one (an editable install), else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "core" / "hookspecs.py").is_file() else None


def build_wheel(into: Path, unpack: bool = True) -> list[Path]:
    """Build plait's wheel; unpacked (the default), the package and its dist-info (entry points) as
    ``py_modules`` folders (Ray pip-installs a .whl given as such, dependencies and all), else the wheel."""
    root = source_root()
    if root is None:
        raise PlaitError("plait is not installed from a source tree, so no wheel can be built; "
                         "install plait on the cluster and use --no-wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             str(root), "-w", str(into)], capture_output=True, text=True)
    if result.returncode != 0:
        raise PlaitError(f"building the plait wheel failed: {result.stderr.strip().splitlines()[-1:]}")
    wheel = next(into.glob("plait-*.whl"))
    if not unpack:
        return [wheel]
    site = into / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return sorted(site.iterdir())


def runtime_env(config: PlaitConfig, plugins: Plugins, workdir: Path, modules: list[Path]) -> dict[str, Any]:
    fragments = list(plugins.call_each(hookspecs.plait_runtime_env, config=config).values())
    base: dict[str, Any] = {"working_dir": str(workdir)}
    if modules:
        base["py_modules"] = [str(m) for m in modules]
    return merge_runtime_envs([base, *fragments])


def submit(config: PlaitConfig, plugins: Plugins, address: str | None, wheel: bool = True) -> tuple[Any, str]:
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="plait-launch-") as tmp:
        workdir = Path(tmp) / "job"
        workdir.mkdir()
        (workdir / "config.yaml").write_text(yaml.safe_dump(job_config(config), sort_keys=False))
        built = build_wheel(Path(tmp) / "dist") if wheel else []
        env = runtime_env(config, plugins, workdir, built)
        submission_id = f"plait-{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        job_id = jobs.submit_job(entrypoint=ENTRYPOINT, runtime_env=env, submission_id=submission_id,
                                 metadata={"plait_run": config.run.name, "plait_version": __version__})
    return jobs, job_id


def follow(jobs: Any, job_id: str) -> str:
    """Stream the job's logs until it ends; Ctrl-C stops the job. Returns its final status."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nplait: stopping job {job_id}", file=sys.stderr)
        jobs.stop_job(job_id)
    for _ in range(60):  # the log stream can end a moment before the status does
        status = str(jobs.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    return status


RAY_IMAGE = "rayproject/ray:2.60.0-py311"  # Ray's own image: Python and Ray, no torch
WHEEL_MOUNT = "/plait"  # where the ConfigMap (config and plait's wheel) is mounted in every pod
MEMORY_PER_CPU = 4 * 2**30  # a worker pod's memory when resources_per_worker gives none


class _Plain(yaml.SafeDumper):
    """YAML without anchors and aliases: the pods' shared parts written out, for people to read and edit."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def pinned_dependencies() -> list[str]:
    """plait's own dependencies (not its extras), pinned to the versions installed here: the set it was
    tested with."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    pins = []
    for line in requires("plait") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        pins.append(f"{requirement.name}{extras}=={version(requirement.name)}")
    return pins


def quantity(size: int) -> str:
    """Bytes as a Kubernetes quantity: 4Gi, 512Mi, or bytes."""
    for unit, scale in (("Gi", 2**30), ("Mi", 2**20)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def pod_resources(config: PlaitConfig) -> dict[str, dict[str, str]]:
    """A worker pod's requests and limits (equal, as KubeRay advises), from ``scaling``: CPUs and GPUs per
    worker, and memory from ``resources_per_worker.memory`` (bytes, Ray's unit) or 4 GiB per CPU."""
    scaling = config.scaling
    per_worker = dict(scaling.resources_per_worker or {})
    cpus = float(per_worker.get("CPU", 1))
    amounts = {"cpu": f"{cpus:g}", "memory": quantity(int(per_worker.get("memory", MEMORY_PER_CPU * max(cpus, 1))))}
    gpus = per_worker.get("GPU", 1 if scaling.use_gpu else 0)
    if gpus:
        amounts["nvidia.com/gpu"] = f"{gpus:g}"
    return {"requests": dict(amounts), "limits": dict(amounts)}


def rayjob_manifest(config: PlaitConfig, plugins: Plugins, image: str | None = None,
                    pip_deps: bool = False) -> str:
    """A KubeRay RayJob and a ConfigMap for ``kubectl apply -f``, made offline (nothing is contacted).

    The ConfigMap holds the resolved config and plait's wheel, mounted at /plait in every pod; the job's
    runtime env pip-installs the wheel. The image must provide torch and plait's dependencies (``image``),
    or ``pip_deps`` installs them, pinned, at the job's start on Ray's own image."""
    if image is None and not pip_deps:
        raise ConfigError("--emit rayjob: name the image with --image IMAGE (one that provides torch and plait's "
                          f"dependencies), or use --pip-deps to install them, pinned, on {RAY_IMAGE}")
    scaling = config.scaling
    workers = max(1, scaling.max_workers)
    runs_dir = config.run.runs_dir
    if not is_uri(runs_dir):
        raise ConfigError(f"{config.source}: run.runs_dir: {runs_dir} is a folder on this machine, which the "
                          f"RayJob's {workers + 1} pods (a head, {workers} worker(s)) neither have nor share; use a "
                          "storage URI that every pod reaches (run.runs_dir=s3://BUCKET/runs, gs://..., or a "
                          "shared mount's file:// path)")
    name = f"plait-{config.run.name}".lower().replace("_", "-")
    with tempfile.TemporaryDirectory(prefix="plait-rayjob-") as tmp:
        wheel = build_wheel(Path(tmp), unpack=False)[0]
        wheel_bytes = base64.b64encode(wheel.read_bytes()).decode()
    fragments = merge_runtime_envs(list(plugins.call_each(hookspecs.plait_runtime_env, config=config).values()))
    pip = [f"{WHEEL_MOUNT}/{wheel.name}", *(pinned_dependencies() if pip_deps else []), *fragments.get("pip", [])]
    env = {k: v for k, v in {**fragments, "pip": pip}.items() if v and k not in ("working_dir", "py_modules")}
    image = image or RAY_IMAGE + ("-gpu" if scaling.use_gpu else "")
    volume = {"name": "plait", "configMap": {"name": f"{name}-files"}}
    mount = {"name": "plait", "mountPath": WHEEL_MOUNT}
    head = {"name": "ray-head", "image": image, "volumeMounts": [mount],
            "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "1", "memory": "4Gi"}}}
    worker = {"name": "ray-worker", "image": image, "volumeMounts": [mount], "resources": pod_resources(config)}
    group: dict[str, Any] = {"groupName": "workers", "replicas": workers, "minReplicas": max(1, scaling.min_workers),
                             "maxReplicas": workers, "rayStartParams": {},
                             "template": {"spec": {"containers": [worker], "volumes": [volume]}}}
    cluster: dict[str, Any] = {
        "rayVersion": "2.60.0",
        # no training worker on the head: it runs the driver, GCS and the job server
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"},
                          "template": {"spec": {"containers": [head], "volumes": [volume]}}},
        "workerGroupSpecs": [group],
    }
    if scaling.elastic:  # pods come and go with the workers Ray Train asks for
        cluster["enableInTreeAutoscaling"] = True
    documents = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-files"},
         "data": {"config.yaml": yaml.safe_dump(job_config(config), sort_keys=False)},
         "binaryData": {wheel.name: wheel_bytes}},
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name},
         "spec": {"entrypoint": f"python -m plait.launch.cli train {WHEEL_MOUNT}/config.yaml",
                  "runtimeEnvYAML": yaml.dump(env, Dumper=_Plain, sort_keys=False),
                  "shutdownAfterJobFinishes": True,
                  "rayClusterSpec": cluster}},
    ]
    return yaml.dump_all(documents, Dumper=_Plain, sort_keys=False)
