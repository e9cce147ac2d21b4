"""lut-fast installs under one import name and lives beside Hugging Face's `datasets`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_only_the_lut_fast_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    wheel = next(tmp_path.glob("lut_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"lut_fast"}, top_level
    for module in ("lut_fast/pipelines/spec.py", "lut_fast/datasets/builtin.py", "lut_fast/models/lut.py", "lut_fast/cli.py"):
        assert module in names, module


def test_hugging_face_datasets_imports_beside_lut_fast(tmp_path):
    code = (
        "import datasets, lut_fast.datasets.builtin, lut_fast.pipelines\n"
        "assert hasattr(datasets, 'load_dataset'), datasets.__file__\n"
        "assert 'site-packages' in datasets.__file__, datasets.__file__\n"
        "ds = datasets.Dataset.from_dict({'x': [1, 2, 3]})\n"
        "assert len(ds) == 3\n"
        "assert lut_fast.datasets.builtin.CLASSES\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
