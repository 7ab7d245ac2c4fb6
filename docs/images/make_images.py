"""Makes the README's pictures of what a user sees: ``runs.png`` (``plait runs --plot`` of three
learning rates on the tiny built-in set) and ``mlflow-run.png`` (the MLflow UI's page of one of
those runs, shot by headless Chromium).

    .venv/bin/python docs/images/make_images.py      # needs chromium (apt-get install chromium)
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from plait.testing import TINY_PLUGINS, write_config

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, lr in (("lr-3e-3", 3e-3), ("lr-1e-3", 1e-3), ("lr-3e-4", 3e-4)):
            config = write_config(root, {**TINY_PLUGINS, "mlflow": {"experiment": "digits"}}, name=name, lr=lr,
                                  epochs=8, log_every=2)
            subprocess.run([str(BIN / "plait"), "train", str(config), "scaling.num_workers=0"], check=True)
        runs = root / "runs"
        subprocess.run([str(BIN / "plait"), "runs", str(runs), "--plot", str(HERE / "runs.png")], check=True)
        store = f"sqlite:///{runs / 'mlflow.db'}"
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=store)
        experiment = client.get_experiment_by_name("digits")
        run = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'lr-3e-3'")[0]
        ui = subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                               "--port", "5077"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(120):
                try:
                    urllib.request.urlopen("http://127.0.0.1:5077/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            page = f"http://127.0.0.1:5077/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            if chromium is None:
                sys.exit("no chromium: apt-get install chromium")
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--window-size=1400,1000", "--virtual-time-budget=20000",
                            f"--screenshot={HERE / 'mlflow-run.png'}", page], check=True, capture_output=True)
        finally:
            ui.terminate()
    print(f"{HERE / 'runs.png'} and {HERE / 'mlflow-run.png'}: written")


if __name__ == "__main__":
    main()
