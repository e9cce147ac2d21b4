"""The declared loader contract: one options dataclass, the Loader protocol, and AugSpec values a backend cannot honour."""

from __future__ import annotations

import importlib.util

import pytest

from lut_fast.config import load_config
from lut_fast.errors import UserError
from lut_fast.pipelines import AUG_LIMITS, BACKENDS, AugSpec, Loader, LoaderOptions, build_loader, check_aug_support

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
HAS_FFCV = importlib.util.find_spec("ffcv") is not None


def test_each_backend_states_its_limits_and_refuses_other_values():
    assert set(AUG_LIMITS) == set(BACKENDS)
    for name in ("src_padding_mode", "interpolation"):
        for value in ("reflect", "edge", "constant", "symmetric") if name == "src_padding_mode" else ("bicubic", "bilinear", "nearest"):
            check_aug_support("torch", AugSpec(img_size=32, **{name: value}))  # the reference honours everything
    with pytest.raises(UserError, match=r"dali backend does not implement aug.src_padding_mode='edge'"):
        check_aug_support("dali", AugSpec(img_size=32, src_padding_mode="edge"))
    check_aug_support("dali", AugSpec(img_size=32, interpolation="nearest"))  # DALI has every filter
    with pytest.raises(UserError, match=r"ffcv backend does not implement aug.interpolation='bilinear'"):
        check_aug_support("ffcv", AugSpec(img_size=32, interpolation="bilinear"))
    with pytest.raises(UserError, match=r"ffcv backend does not implement aug.src_padding_mode='constant'"):
        check_aug_support("ffcv", AugSpec(img_size=32, src_padding_mode="constant"))
    # the MAE view has no simple random crop: its padding settings are unused by every backend
    check_aug_support("ffcv", AugSpec(recipe="mae", img_size=32, src_padding_mode="constant"))


def test_the_config_refuses_before_any_work_and_the_error_is_one_line():
    with pytest.raises(UserError, match="ffcv backend does not implement aug.interpolation='nearest'") as e:
        load_config(None, {"data.backend": "ffcv", "run.device": "cpu"}, ["aug.interpolation=nearest"])
    assert "\n" not in str(e.value)
    load_config(None, {"data.backend": "torch", "run.device": "cpu"}, ["aug.interpolation=nearest"])  # torch: fine


@pytest.mark.skipif(not HAS_DALI, reason="DALI is not installed (pip install 'lut-fast[dali]')")
def test_dali_loader_refuses_an_unsupported_padding_mode():
    with pytest.raises(UserError, match="aug.src_padding_mode='symmetric'"):
        build_loader("dali", None, AugSpec(img_size=32, src_padding_mode="symmetric"), 4, num_workers=1)


@pytest.mark.skipif(not HAS_FFCV, reason="FFCV is not installed (pip install 'lut-fast[ffcv]')")
def test_ffcv_loader_refuses_an_unsupported_filter_before_reading_data(tmp_path):
    from lut_fast.pipelines.ffcv_backend import FfcvLoader

    with pytest.raises(UserError, match="aug.interpolation='bilinear'"):
        FfcvLoader(tmp_path / "not_read.beton", LoaderOptions(AugSpec(img_size=32, interpolation="bilinear"), 4))


def test_every_backend_class_declares_the_protocol():
    from lut_fast.pipelines.torch_backend import TorchLoader

    classes = [TorchLoader]
    if HAS_DALI:
        from lut_fast.pipelines.dali_backend import DaliLoader

        classes.append(DaliLoader)
    if HAS_FFCV:
        from lut_fast.pipelines.ffcv_backend import FfcvLoader

        classes.append(FfcvLoader)
    for cls in classes:
        for member in ("__len__", "set_epoch", "__iter__", "raw_batches", "close"):
            assert callable(getattr(cls, member, None)), f"{cls.__name__} lacks {member}"
        assert cls.backend in BACKENDS
    loader = build_loader("torch", None, AugSpec(img_size=32), 8, num_workers=0, seed=1)
    try:
        assert isinstance(loader, Loader) and len(loader) == 480 // 8
        loader.set_epoch(0, start_batch=len(loader) - 1)
        batches = list(loader)
        assert len(batches) == 1 and batches[0].view1.shape == (8, 3, 32, 32) and batches[0].view2 is not None
    finally:
        loader.close()
    with pytest.raises(UserError, match="batch size must be positive"):
        LoaderOptions(AugSpec(img_size=32), 0)
