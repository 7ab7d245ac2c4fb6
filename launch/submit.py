"""``plait launch``: run a config as a Ray job on a cluster, or emit a KubeRay RayJob.

The job's runtime env carries a freshly built wheel of plait (``py_modules``), the resolved
config (``working_dir``) and what plugins add through ``plait_runtime_env``. The cluster's
Python needs plait's dependencies (torch, transformers, timm, ...). Resubmitting the same
run name resumes it, from the run folder on the cluster.
"""
from __future__ import annotations

import asyncio
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


def build_wheel(into: Path) -> list[Path]:
    """Build plait's wheel and unpack it: the package and its dist-info (entry points), as
    ``py_modules`` folders. (Ray pip-installs a .whl given as such, dependencies and all.)"""
    root = source_root()
    if root is None:
        raise PlaitError("plait is not installed from a source tree, so no wheel can be built; "
                         "install plait on the cluster and use --no-wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             str(root), "-w", str(into)], capture_output=True, text=True)
    if result.returncode != 0:
        raise PlaitError(f"building the plait wheel failed: {result.stderr.strip().splitlines()[-1:]}")
    wheel = next(into.glob("plait-*.whl"))
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


def rayjob_manifest(config: PlaitConfig, plugins: Plugins) -> str:
    """A KubeRay RayJob (and a ConfigMap with the resolved config) for ``kubectl apply -f``."""
    name = f"plait-{config.run.name}".lower().replace("_", "-")
    fragments = merge_runtime_envs(list(plugins.call_each(hookspecs.plait_runtime_env, config=config).values()))
    env = {**fragments, "pip": [f"plait=={__version__}", *fragments.get("pip", [])],
           "working_dir": None}
    env = {k: v for k, v in env.items() if v}
    image = "rayproject/ray:2.60.0-py311" + ("-gpu" if config.scaling.use_gpu else "")
    volume = {"name": "plait-config", "configMap": {"name": f"{name}-config"}}
    mount = {"name": "plait-config", "mountPath": "/plait"}
    container = {"name": "ray-head", "image": image, "volumeMounts": [mount]}
    workers = max(1, config.scaling.max_workers)
    documents = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config"},
         "data": {"config.yaml": yaml.safe_dump(job_config(config), sort_keys=False)}},
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name},
         "spec": {
             "entrypoint": "python -m plait.launch.cli train /plait/config.yaml",
             "runtimeEnvYAML": yaml.safe_dump(env, sort_keys=False),
             "shutdownAfterJobFinishes": True,
             "rayClusterSpec": {
                 "rayVersion": "2.60.0",
                 "headGroupSpec": {"rayStartParams": {},
                                   "template": {"spec": {"containers": [container], "volumes": [volume]}}},
                 "workerGroupSpecs": [{
                     "groupName": "workers", "replicas": workers, "minReplicas": workers, "maxReplicas": workers,
                     "rayStartParams": {},
                     "template": {"spec": {"containers": [{**container, "name": "ray-worker"}],
                                           "volumes": [volume]}}}],
             },
         }},
    ]
    return yaml.safe_dump_all(documents, sort_keys=False)
