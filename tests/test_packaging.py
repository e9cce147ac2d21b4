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


def test_cuda12_constraints_pin_the_tested_versions_within_pyproject_ranges():
    """constraints-cu12.txt (V100 / CUDA 12 pip route): the CUDA 12 builds of exactly the tested versions."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    def pins(path: Path) -> dict[str, str]:
        lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
        return dict(ln.split("==") for ln in lines if ln)

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    tested, cu12 = pins(REPO / "constraints.txt"), pins(REPO / "constraints-cu12.txt")
    assert set(tested) <= set(cu12), "every pin of constraints.txt needs its CUDA 12 build"
    for name, version in tested.items():
        v = Version(cu12[name])
        assert v.public == version, (name, cu12[name])
        if name in ("torch", "torchvision"):  # the CUDA builds; the rest (simplejpeg) is the same wheel
            assert v.local and v.local.startswith("cu12"), (name, cu12[name])
            assert ranges[name].contains(v), (name, cu12[name], str(ranges[name]))
    dali = Requirement(project["optional-dependencies"]["dali"][0])
    assert dali.name == "nvidia-dali-cuda130" and cu12["nvidia-dali-cuda120"] == str(dali.specifier).lstrip("=")


def test_license_is_an_spdx_expression():
    """PEP 639: a plain SPDX string (the table form is deprecated in setuptools >= 77)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
