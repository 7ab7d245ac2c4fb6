"""The built wheel installs everything under plait.* and its entry points work."""
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_wheel_installs_only_plait_packages_and_runs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("plait-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"plait"}  # no generic `core`, `plugins`
    # A fresh venv that sees the project's dependencies but not its editable install.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = ("import plait.core, plait.launch.cli, plait.plugins.fusion, plait.modalities.audio; "
            "print(plait.core.__file__)")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout
    assert out.strip().startswith(str(site))
    listing = subprocess.run([str(venv / "bin" / "python"), "-m", "plait.launch.cli", "plugins", "--json"],
                             check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert '"spoken_digits"' in listing
