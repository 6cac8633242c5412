import json
import re

import pytest

from configs import PRESETS, Config, ConfigError, format_config, get_config


def test_defaults_are_the_reference_recipe():
    cfg = get_config()
    assert cfg.crop_size == (1024, 1024) and cfg.batch_size == 16 and cfg.max_iter == 80000
    assert (cfg.lr, cfg.weight_decay, cfg.momentum) == (1e-2, 5e-4, 0.9)
    assert (cfg.warmup_iters, cfg.poly_power, cfg.ohem_thresh) == (1000, 0.9, 0.7)
    assert (cfg.num_classes, cfg.data_root) == (19, "data")
    assert cfg.eval_scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert cfg.run_name == "cityscapes"


def test_one_gpu_preset_halves_lr_and_doubles_iterations():
    ref, one = get_config("cityscapes"), get_config("cityscapes_1gpu")
    assert one.batch_size == ref.batch_size // 2
    assert one.lr == pytest.approx(ref.lr / 2) and one.max_iter == 2 * ref.max_iter


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    cfg = get_config(name)
    assert isinstance(cfg, Config) and cfg.run_name == name


def test_overrides_are_parsed_by_the_type_of_the_default():
    cfg = get_config("synthetic", ["max_iter=70", "lr=0.5", "arm=false", "global_pool=0", "crop_size=[64, 96]",
                                   "scales=0.5,1,1.5", "fusion=sum", "run_name=a=b"])
    assert cfg.max_iter == 70 and isinstance(cfg.max_iter, int)
    assert cfg.lr == 0.5 and cfg.arm is False and cfg.global_pool is False
    assert cfg.crop_size == (64, 96) and cfg.scales == (0.5, 1.0, 1.5)
    assert cfg.fusion == "sum" and cfg.run_name == "a=b"
    assert cfg.data_root == "data/synthetic"  # from the preset, not overridden


def test_a_misspelled_key_or_preset_gets_the_closest_name_not_the_whole_list():
    with pytest.raises(ConfigError) as err:
        get_config("cityscapes", ["max_iters=100"])
    assert str(err.value) == ("unknown config key 'max_iters'; did you mean 'max_iter'?; every key is a commented "
                              "field of Config in configs.py")
    with pytest.raises(ConfigError) as err:
        get_config("camvid_v3")
    assert str(err.value).startswith("unknown config 'camvid_v3'; did you mean 'camvid_v2'?; presets: cityscapes, ")
    with pytest.raises(ConfigError) as err:
        get_config("cityscapes", ["xyzzy=1"])
    assert str(err.value).startswith("unknown config key 'xyzzy'; every key")  # nothing close: no guess


@pytest.mark.parametrize("override, words", [
    ("max_iter=ten", "max_iter: 'ten' is not an integer (default: 80000)"),
    ("lr=fast", "lr: 'fast' is not a finite number"),
    ("lr=nan", "lr: 'nan'"),
    ("arm=maybe", "arm: 'maybe' is not true or false"),
    ("crop_size=1,x", "crop_size"),
    ("crop_size=512", "expected two positive integers"),
    ("fusion=concat", "expected one of ffm, sum"),
    ("eval_mode=fast", "expected one of ss, ssc, msf, mscf"),
    ("warmup_iters=80000", "warmup_iters"),
    ("eval_stride=0", "eval_stride"),
    ("max_iter", "expected key=value"),
    ("hflip=1.5", "hflip: 1.5; expected a number in [0, 1]"),
    ("brightness=1.5", "brightness: 1.5; expected a number in [0, 1)"),
    ("ohem_min_frac=0", "ohem_min_frac: 0.0; expected a number in (0, 1]"),
    ("warmup_start=0", "warmup_start: 0.0; expected a number in (0, 1]"),
    ("lr=-0.01", "lr: -0.01; expected a number in (0, inf)"),
    ("weight_decay=-1", "weight_decay"),
    ("momentum=1", "momentum"),
    ("workers=-1", "workers: -1; expected 0 or more"),
    ("eval_crop=512", "eval_crop"),
    ("dist_timeout=0", "dist_timeout: 0; expected a positive integer"),
])
def test_bad_values_are_errors_that_name_them(override, words):
    with pytest.raises(ConfigError, match=None) as err:
        get_config("cityscapes", [override])
    assert words in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="cityscapes_1gpu"):
        get_config("imagenet")


def test_config_round_trips_through_json_as_a_base():
    cfg = get_config("synthetic", ["max_iter=90"])
    stored = json.loads(format_config(cfg))  # what a run directory / checkpoint keeps
    again = get_config(base=stored, overrides=["eval_mode=msf"])
    assert again.max_iter == 90 and again.crop_size == cfg.crop_size and again.eval_mode == "msf"
    assert isinstance(again.crop_size, tuple)


def test_eval_crop_is_empty_by_default_and_parses_as_integers():
    # empty means "the training crop" (evaluate.py); an override gives integers although the default has no element
    assert get_config().eval_crop == () and get_config("synthetic").eval_crop == ()
    cfg = get_config("cityscapes", ["eval_crop=512,768"])
    assert cfg.eval_crop == (512, 768) and all(isinstance(v, int) for v in cfg.eval_crop)
    assert get_config("cityscapes", ["eval_crop="]).eval_crop == ()


def test_boundary_values_that_are_allowed():
    cfg = get_config("cityscapes", ["hflip=0", "hflip=1", "brightness=0", "ohem_min_frac=1", "weight_decay=0",
                                    "aux_weight=0", "workers=0", "momentum=0"])
    assert (cfg.hflip, cfg.brightness, cfg.ohem_min_frac, cfg.workers) == (1.0, 0.0, 1.0, 0)


def test_a_folder_dataset_on_the_default_preset_is_named_folder():
    assert get_config("cityscapes", ["dataset=folder", "num_classes=2"]).run_name == "folder"
    assert get_config("camvid", ["dataset=folder"]).run_name == "camvid"
    assert get_config("cityscapes", ["dataset=folder", "num_classes=2", "run_name=mine"]).run_name == "mine"


def test_syncbn_is_on_where_the_reference_config_has_it():
    # CoinCheung/BiSeNet: configs/bisenetv1_city.py use_sync_bn=False; bisenetv2_city.py, bisenetv1_ade20k.py,
    # bisenetv2_ade20k.py, bisenetv1_coco.py and bisenetv2_coco.py True
    for name in PRESETS:
        cfg = get_config(name)
        assert cfg.sync_bn == (cfg.arch == "bisenetv2" or cfg.dataset in ("ade20k", "cocostuff")), name


def test_ade20k_and_cocostuff_presets_are_coincheungs_configs():
    # written out from configs/bisenetv{1,2}_{ade20k,coco}.py: lr_start, weight_decay, max_iter, scales, cropsize,
    # eval_crop, eval_start_shortside, ims_per_gpu x GPUs (8 x 8, 2 x 8, 4 x 4, 2 x 8), img_mean/img_std
    expected = {
        "ade20k": (4e-2, 1e-4, 40000, (0.5, 2.0), (512, 512), (512, 512), 512, 64, (0.485, 0.456, 0.406)),
        "ade20k_v2": (5e-3, 1e-4, 160000, (0.5, 2.0), (640, 640), (640, 640), 640, 16, (0.4934, 0.4682, 0.4311)),
        "cocostuff": (1e-2, 1e-4, 90000, (0.5, 2.0), (512, 512), (512, 512), 0, 16, (0.485, 0.456, 0.406)),
        "cocostuff_v2": (5e-3, 1e-4, 180000, (0.75, 2.0), (640, 640), (640, 640), 0, 16, (0.4696, 0.4464, 0.4072)),
    }
    for name, values in expected.items():
        cfg = get_config(name)
        assert (cfg.lr, cfg.weight_decay, cfg.max_iter, cfg.scales, cfg.crop_size, cfg.eval_crop, cfg.eval_short_side,
                cfg.batch_size, cfg.mean) == values, name
        assert cfg.warmup_iters == 1000 and cfg.num_classes == (150 if name.startswith("ade") else 171)
        assert cfg.pretrained == ("torchvision" if cfg.arch == "bisenetv1" else "none")


# ---- hostile input ----

@pytest.mark.parametrize("override, words", [
    ("seed=-1", "bad value for seed: -1; expected an integer in 0..4294967295"),
    ("seed=99999999999999999999", "bad value for seed: 99999999999999999999"),
    ("image_dir={foo}", "bad value for image_dir: '{foo}'; expected a folder under data_root"),
    ("label_dir={split", "bad value for label_dir: '{split'"),
    ("label_dir={0}annot", "bad value for label_dir: '{0}annot'"),
    ("label_remap=3:0,3:1", "bad value for label_remap: 3:0, 3:1 maps label value 3 more than once"),
])
def test_values_that_would_fail_later_are_one_line_now(override, words):
    with pytest.raises(ConfigError) as err:
        get_config("camvid", [override])
    assert str(err.value).startswith(words)


@pytest.mark.parametrize("key, value, words", [
    ("num_classes", "11", "bad stored value for num_classes: '11' (str); expected an int"),
    ("lr", None, "bad stored value for lr: None (NoneType); expected a float"),
    ("crop_size", 5, "bad stored value for crop_size: 5 (int); expected a list"),
])
def test_a_stored_config_of_other_types_is_one_line_naming_the_key(key, value, words):
    stored = {**get_config("camvid").to_dict(), key: value}
    with pytest.raises(ConfigError, match=f"^{re.escape(words)}"):
        get_config(base=stored)
    assert get_config(base={**get_config("camvid").to_dict(), "lr": 1}).lr == 1.0  # an int where a float goes


def test_a_max_iter_shorter_than_the_presets_warmup_shortens_it_with_a_note():
    notes = []
    cfg = get_config("camvid", ["max_iter=40"], notes=notes)  # camvid warms up for 100 iterations
    assert (cfg.max_iter, cfg.warmup_iters) == (40, 4)
    assert notes == ["note: max_iter=40 leaves no room for the preset's warmup (100 iterations): warmup_iters=4, a "
                     "tenth of the run; set warmup_iters=N to choose"]
    assert get_config("camvid", ["max_iter=400"]).warmup_iters == 100  # room left: the preset's warmup
    with pytest.raises(ConfigError, match="bad value for warmup_iters: 100; expected 0 <= warmup_iters < max_iter"):
        get_config("camvid", ["max_iter=40", "warmup_iters=100"])  # the user's own warmup keeps its check
