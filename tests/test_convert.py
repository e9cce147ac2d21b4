"""``lut-fast convert ffcv|dali`` on a folder with bad files, then training on the outputs.

The source: three built-in classes (16 images each) plus, inside them, a
PNG with alpha, a CMYK JPEG, a grayscale JPEG and a palette PNG (converted
to RGB), and a truncated JPEG, a non-image with a .jpg name, a zero-byte
file and a .txt file (skipped and reported). The checks: every good image is
written once with torchvision ImageFolder's label, every bad file is
reported, outputs appear only complete and only with --overwrite when they
exist, and the trainer runs a few steps on each output.
"""

from __future__ import annotations

import errno
import json
import shutil
import tarfile
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lut_fast.datasets import dali_writer, ffcv_writer, sources
from lut_fast.datasets.builtin import builtin_path
from lut_fast.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CLASSES = ("circle", "square", "star")
PER_CLASS = 16
GOOD_EXTRA = {"circle/rgba.png": "RGBA", "square/cmyk.jpg": "CMYK", "star/gray.jpg": "L", "star/palette.png": "P"}
BAD = {
    "circle/truncated.jpg": "unreadable",
    "square/not_an_image.jpg": "unreadable",
    "star/empty.jpg": "empty file",
    "star/notes.txt": "not an image",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    for cls in CLASSES:
        (root / "train" / cls).mkdir(parents=True)
        for src in sorted((builtin_path() / "train" / cls).glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(src, root / "train" / cls / src.name)
    rgb = Image.open(root / "train" / "circle" / "circle_0000.jpg").convert("RGB")
    for name, mode in GOOD_EXTRA.items():
        rgb.convert(mode).save(root / "train" / name)
    jpeg = (root / "train" / "circle" / "circle_0001.jpg").read_bytes()
    (root / "train" / "circle/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "train" / "square/not_an_image.jpg").write_bytes(b"this is not a JPEG\n" * 20)
    (root / "train" / "star/empty.jpg").write_bytes(b"")
    (root / "train" / "star/notes.txt").write_text("a stray file\n")
    return root


def torchvision_mapping(root: Path) -> dict[str, int]:
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root / "train")).class_to_idx


def expected_labels(root: Path) -> Counter:
    mapping = torchvision_mapping(root)
    counts = Counter({mapping[c]: PER_CLASS for c in CLASSES})
    for name in GOOD_EXTRA:
        counts[mapping[name.split("/")[0]]] += 1
    return counts


def check_report(report: sources.ConversionReport, root: Path) -> None:
    assert report.images == len(CLASSES) * PER_CLASS + len(GOOD_EXTRA)
    assert report.classes == list(CLASSES)
    skipped = {str(Path(p).relative_to(root / "train")): reason for p, reason in report.skipped}
    assert set(skipped) == set(BAD)
    for name, reason in BAD.items():
        assert skipped[name].startswith(reason), (name, skipped[name])
    assert report.bytes > 0 and report.seconds > 0


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory) -> tuple[Path, sources.ConversionReport]:
    out = tmp_path_factory.mktemp("dali") / "shards"
    return out, dali_writer.write_shards(source, out, shard_size=20, workers=2)


@pytest.fixture(scope="module")
def beton(source, tmp_path_factory) -> tuple[Path, sources.ConversionReport]:
    out = tmp_path_factory.mktemp("ffcv") / "train.beton"
    return out, ffcv_writer.write_beton(source, out, max_resolution=128, workers=2)


def test_dali_conversion_report_labels_and_index(source, shards):
    out, report = shards
    check_report(report, source)
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads((out / "classes.json").read_text()) == torchvision_mapping(source)
    assert manifest["num_samples"] == report.images == sum(s["samples"] for s in manifest["shards"])
    assert len(manifest["shards"]) == -(-report.images // 20)
    labels = Counter()
    for shard in manifest["shards"]:
        index = (out / shard["index"]).read_text().splitlines()
        assert index[0] == f"v1.2 {shard['samples']}" and len(index) == shard["samples"] + 1
        entries = {}
        for line in index[1:]:
            fields = line.split()
            for i in range(0, len(fields), 4):
                ext, offset, size, name = fields[i : i + 4]
                entries[name] = (ext, int(offset), int(size))
        with tarfile.open(out / shard["tar"]) as tar:
            members = tar.getmembers()
            assert {m.name for m in members} == set(entries)
            for m in members:  # the index points at the member's data, as DALI's reader expects
                assert entries[m.name][1:] == (m.offset_data, m.size)
                data = tar.extractfile(m).read()
                if m.name.endswith(".jpg"):
                    with Image.open(BytesIO(data)) as img:
                        assert img.format == "JPEG" and img.mode == "RGB"
                elif m.name.endswith(".label"):
                    labels[int(np.frombuffer(data, "<i8")[0])] += 1
                else:
                    assert m.name.endswith(".cls") and data.decode().isdigit()
    assert labels == expected_labels(source)
    assert no_leftovers(out.parent)


def test_ffcv_conversion_report_and_labels(source, beton):
    from ffcv.reader import Reader

    out, report = beton
    check_report(report, source)
    assert json.loads(ffcv_writer.classes_path(out).read_text()) == torchvision_mapping(source)
    reader = Reader(str(out))
    assert reader.num_samples == report.images
    assert Counter(reader.metadata["f1"].tolist()) == expected_labels(source)
    assert max(reader.metadata["f0"]["width"].max(), reader.metadata["f0"]["height"].max()) <= 128
    assert no_leftovers(out.parent)


def test_existing_output_needs_overwrite(source, shards, beton):
    for out, convert in ((shards[0], dali_writer.write_shards), (beton[0], ffcv_writer.write_beton)):
        before = sources.path_size(out)
        with pytest.raises(UserError, match="--overwrite"):
            convert(source, out, workers=1)
        assert sources.path_size(out) == before


def test_failed_dali_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    calls = []

    def failing_add(self, key, image, label):
        calls.append(key)
        if len(calls) == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, key, image, label)

    real_add = dali_writer._ShardWriter.add
    monkeypatch.setattr(dali_writer._ShardWriter, "add", failing_add)
    with pytest.raises(UserError, match=f"no space left on {tmp_path} "):
        dali_writer.write_shards(source, tmp_path / "out", shard_size=4, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_failed_ffcv_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    from ffcv.writer import DatasetWriter

    def failing_write(self, dataset, **_):
        Path(self.fname).write_bytes(b"half a file")
        raise RuntimeError("worker died (simulated)")

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", failing_write)
    with pytest.raises(RuntimeError, match="simulated"):
        ffcv_writer.write_beton(source, tmp_path / "x.beton", workers=1)
    assert list(tmp_path.iterdir()) == []


def no_writer_left_behind() -> None:
    import multiprocessing
    import signal

    assert multiprocessing.active_children() == []
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the watchdog's handler is gone again


@pytest.mark.timeout(180)
def test_a_full_disk_in_an_ffcv_writer_process_is_one_line_not_a_hang(source, tmp_path, monkeypatch):
    """FFCV's parent waits forever on a worker that died; this one died flushing its last page (ENOSPC)."""
    from ffcv.memory_allocator import MemoryAllocator

    def full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MemoryAllocator, "flush_page", full_disk)  # the workers are forked: they inherit it
    with pytest.raises(UserError, match=f"no space left on {tmp_path} \\(while writing x.beton\\)") as err:
        ffcv_writer.write_beton(source, tmp_path / "x.beton", workers=2)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    no_writer_left_behind()


@pytest.mark.timeout(180)
def test_an_ffcv_writer_process_killed_mid_write_is_one_line_not_a_hang(source, tmp_path, monkeypatch):
    """The out-of-memory killer's SIGKILL leaves no error behind: the exit code is what the message says."""
    import os
    import signal

    real_getitem = ffcv_writer._ImageDataset.__getitem__

    def killed_at_the_fifth(self, i):
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_getitem(self, i)

    monkeypatch.setattr(ffcv_writer._ImageDataset, "__getitem__", killed_at_the_fifth)
    with pytest.raises(UserError, match="an FFCV writer process was killed by signal 9 .*out-of-memory"):
        ffcv_writer.write_beton(source, tmp_path / "x.beton", workers=2, chunk_size=4)
    assert list(tmp_path.iterdir()) == []
    no_writer_left_behind()


def test_overwrite_replaces_atomically(source, tmp_path):
    out = tmp_path / "shards"
    dali_writer.write_shards(source, out, workers=1, shard_size=1000)
    (out / "stale.txt").write_text("from an older conversion")
    report = dali_writer.write_shards(source, out, workers=1, shard_size=25, overwrite=True)
    assert not (out / "stale.txt").exists() and len(list(out.glob("*.tar"))) == -(-report.images // 25)
    assert no_leftovers(tmp_path)


def test_convert_cli_reports_and_refuses(source, tmp_path):
    from typer.testing import CliRunner

    from lut_fast.datasets.convert import convert_app

    runner = CliRunner()
    result = runner.invoke(convert_app, ["dali", str(source), str(tmp_path / "s"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(convert_app, ["dali", str(source), str(tmp_path / "s")])
    assert isinstance(again.exception, UserError) and "--overwrite" in str(again.exception)
    wrong = runner.invoke(convert_app, ["ffcv", str(source), str(tmp_path / "x.ffcv")])
    assert isinstance(wrong.exception, UserError) and ".beton" in str(wrong.exception)


def test_convert_ffcv_without_ffcv_says_how_to_install(source, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ffcv" else real(name, *a))
    with pytest.raises(UserError, match="pip install"):
        ffcv_writer.write_beton(source, tmp_path / "x.beton")


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
@pytest.mark.slow
def test_train_on_converted_output(backend, shards, beton, tmp_path):
    from helpers import tiny_config

    from lut_fast.train import train

    data = shards[0] if backend == "dali" else beton[0]
    cfg = tiny_config(tmp_path / "run", "data.num_workers=2", data__backend=backend, data__path=str(data), max_steps=3)
    result = train(cfg)
    assert result.steps == 3 and np.isfinite(result.final_metrics["loss"])


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_shorter_side_storage_and_its_metadata(source, tmp_path, backend):
    """--shorter-side S: every image larger than S is stored with its shorter side at S (the SRC rule);
    the choice is recorded, and read back by stored_metadata. The output's parent folders are created."""
    from lut_fast.pipelines.formats import stored_metadata

    side = 40  # the built-in images are 96-144 px
    if backend == "dali":
        out = tmp_path / "new" / "dali" / "train"  # parents do not exist yet
        report = dali_writer.write_shards(source, out, workers=2, shorter_side=side, jpeg_quality=90)
        sizes = []
        for tar_path in sorted(out.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".jpg"):
                        with Image.open(tar.extractfile(m)) as img:
                            sizes.append(img.size)
    else:
        from ffcv.reader import Reader

        out = tmp_path / "new" / "ffcv" / "train.beton"
        report = ffcv_writer.write_beton(source, out, workers=2, shorter_side=side, jpeg_quality=90)
        meta = Reader(str(out)).metadata["f0"]
        sizes = list(zip(meta["width"].tolist(), meta["height"].tolist()))
        assert not list(out.parent.glob(".*"))  # the sidecar was written atomically: no temporary left
    check_report(report, source)
    originals = [Image.open(p).size for p, _ in sources.list_source(source).samples if not p.endswith(("truncated.jpg", "not_an_image.jpg"))]
    assert sorted(sizes) == sorted(sources.shorter_side_size(*wh, side) if min(wh) > side else wh for wh in originals)
    meta = stored_metadata(out)
    assert meta["format"] == backend and meta["shorter_side"] == side and meta["quality"] == 90
    assert meta["num_samples"] == report.images and meta["source"] == str(source / "train")
    assert "max_resolution" in meta


def test_size_options_are_checked(source, tmp_path):
    with pytest.raises(UserError, match="--shorter-side must be positive"):
        dali_writer.write_shards(source, tmp_path / "a", shorter_side=0)
    with pytest.raises(UserError, match="below --shorter-side"):
        ffcv_writer.write_beton(source, tmp_path / "a.beton", shorter_side=256, max_resolution=128)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        dali_writer.write_shards(source, tmp_path / "file" / "out")


def test_convert_cli_creates_parent_folders(source, tmp_path):
    """`lut-fast convert dali photos out/x/train` works when out/x does not exist yet."""
    from typer.testing import CliRunner

    from lut_fast.datasets.convert import convert_app

    out = tmp_path / "out" / "x" / "train"
    result = CliRunner().invoke(convert_app, ["dali", str(source), str(out), "--workers", "1", "--shorter-side", "64"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["shorter_side"] == 64


# ---------------------------------------------------------------- convert folder (the torch backend's storage)


def test_folder_conversion_stores_at_the_shorter_side(source, tmp_path):
    """convert folder: one split as <class>/<file>.jpg, every image above S shrunk by the converters' rule,
    RGB JPEGs already small enough copied byte for byte, torchvision's labels kept, bad files reported, the
    choice recorded for stored_metadata, nothing left behind."""
    from torchvision.datasets import ImageFolder

    from lut_fast.datasets import folder_writer
    from lut_fast.pipelines.formats import stored_metadata

    side = 100  # the built-in images are 96-144 px: some are shrunk, some kept
    out = tmp_path / "new" / "stored" / "train"  # parents do not exist yet
    report = folder_writer.write_folder(source, out, side, workers=2, jpeg_quality=90)
    check_report(report, source)
    assert no_leftovers(out.parent)
    stored = ImageFolder(str(out))
    assert stored.class_to_idx == torchvision_mapping(source)
    assert Counter(stored.targets) == expected_labels(source)
    src_root = source / "train"
    resized = copied = 0
    for path, _label in sources.list_source(source).samples:
        rel = Path(path).relative_to(src_root)
        if str(rel) in BAD:
            assert not (out / folder_writer.stored_name(rel)).exists()
            continue
        dest = out / folder_writer.stored_name(rel)
        with Image.open(path) as a, Image.open(dest) as b:
            assert b.format == "JPEG" and b.mode == "RGB"
            assert b.size == (sources.shorter_side_size(*a.size, side) if min(a.size) > side else a.size)
            if a.format == "JPEG" and a.mode == "RGB" and min(a.size) <= side:
                assert dest.read_bytes() == Path(path).read_bytes()
                copied += 1
            resized += min(a.size) > side
    assert resized and copied  # both paths ran
    assert (out / "circle" / "rgba.png.jpg").is_file() and (out / "square" / "cmyk.jpg").is_file()
    meta = stored_metadata(out)
    assert meta["format"] == "imagefolder" and meta["shorter_side"] == side and meta["quality"] == 90
    assert meta["num_samples"] == report.images and meta["source"] == str(src_root) and meta["max_resolution"] is None
    assert stored_metadata(out.parent) == meta  # a split root holding train/
    assert stored_metadata(source) is None  # a plain image folder


def test_folder_conversion_keeps_every_class_and_distinct_names(tmp_path):
    """A class whose files are all unreadable keeps its (empty) folder, so the class indices do not shift;
    x.png and x.png.jpg in one folder both survive."""
    from lut_fast.datasets import folder_writer

    src = tmp_path / "src"
    for cls in ("a", "b", "c"):
        (src / cls).mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "a" / "x.png")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(src / "a" / "x.png.jpg")
    Image.new("RGB", (50, 60), (10, 10, 200)).save(src / "a" / "deep.jpeg")
    (src / "b" / "broken.jpg").write_bytes(b"not a jpeg" * 10)
    (src / "c" / "sub").mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(src / "c" / "sub" / "y.jpg")
    out = tmp_path / "out"
    report = folder_writer.write_folder(src, out, 32, workers=1)
    assert report.images == 4 and [p for p, _ in report.skipped] == [str(src / "b" / "broken.jpg")]
    assert sorted(p.name for p in (out / "a").iterdir()) == ["deep.jpeg", "x.png-1.jpg", "x.png.jpg"]
    assert (out / "b").is_dir() and not list((out / "b").iterdir())
    with Image.open(out / "c" / "sub" / "y.jpg") as img:
        assert img.size == (32, 32)


def test_folder_conversion_errors_and_overwrite(source, tmp_path):
    from typer.testing import CliRunner

    from lut_fast.datasets import folder_writer
    from lut_fast.datasets.convert import convert_app

    out = tmp_path / "s224"
    runner = CliRunner()
    result = runner.invoke(convert_app, ["folder", str(source), str(out), "--shorter-side", "64", "--workers", "1"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(convert_app, ["folder", str(source), str(out), "--shorter-side", "64"])
    assert isinstance(again.exception, UserError) and "--overwrite" in str(again.exception)
    (out / "stale.txt").write_text("from an older conversion")
    result = runner.invoke(convert_app, ["folder", str(source), str(out), "--shorter-side", "48", "--overwrite",
                                         "--workers", "1"])
    assert result.exit_code == 0 and not (out / "stale.txt").exists() and no_leftovers(tmp_path)
    assert json.loads((out / folder_writer.METADATA).read_text())["shorter_side"] == 48
    missing = runner.invoke(convert_app, ["folder", str(source), str(tmp_path / "x")])
    assert missing.exit_code == 2 and "--shorter-side" in missing.output
    for args, message in ((["--shorter-side", "0"], "--shorter-side must be positive"),
                          (["--shorter-side", "64", "--jpeg-quality", "0"], "--jpeg-quality"),
                          (["--shorter-side", "64", "--max-resolution", "32"], "below --shorter-side")):
        bad = runner.invoke(convert_app, ["folder", str(source), str(tmp_path / "y"), *args])
        assert isinstance(bad.exception, UserError) and message in str(bad.exception), bad.output
    inside = runner.invoke(convert_app, ["folder", str(source), str(source / "train" / "stored"), "--shorter-side", "64"])
    assert isinstance(inside.exception, UserError) and "inside the source" in str(inside.exception)
    assert not (tmp_path / "y").exists() and not (source / "train" / "stored").exists()


def test_failed_folder_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    from lut_fast.datasets import folder_writer

    calls = {"n": 0}
    real = sources.stored_jpeg

    def fail_late(*args):
        calls["n"] += 1
        if calls["n"] > 10:
            raise RuntimeError("disk full")
        return real(*args)

    monkeypatch.setattr(sources, "stored_jpeg", fail_late)
    with pytest.raises(RuntimeError):
        folder_writer.write_folder(source, tmp_path / "out", 64, workers=1)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)
