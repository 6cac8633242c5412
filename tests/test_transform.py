import cv2
import numpy as np
import pytest
import torch

from transform import EvalTransform, TrainTransform, color_jitter, normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def no_jitter(crop, scales, sampling="range", hflip=0.5):
    return TrainTransform(crop, scales, sampling, hflip, 0, 0, 0)


def self_encoding_pair(h, w, block, seed=0):
    """A label of blocks of random train ids (some 255), and an image whose red channel encodes it."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(np.r_[np.arange(19), 255], size=(h // block + 1, w // block + 1)).astype(np.uint8)
    label = np.repeat(np.repeat(coarse, block, 0), block, 1)[:h, :w]
    image = np.stack([label, rng.integers(0, 256, (h, w), dtype=np.uint8), label], axis=2)
    return image, label


def test_label_and_image_stay_aligned_through_scale_crop_flip():
    image, label = self_encoding_pair(60, 90, block=12)
    tf = no_jitter((48, 64), (0.5, 2.0))
    for seed in range(40):
        img, lbl = tf.geometry(image, label, np.random.default_rng(seed))
        assert img.shape == (48, 64, 3) and lbl.shape == (48, 64)
        assert set(np.unique(lbl)) <= set(range(19)) | {255}
        # Inside a block (the label constant over the 3x3 neighbourhood) bilinear sampling reproduces the code.
        inner = (cv2.erode(lbl, np.ones((3, 3), np.uint8)) == cv2.dilate(lbl, np.ones((3, 3), np.uint8)))
        inner &= lbl != 255
        inner[[0, -1]] = False
        inner[:, [0, -1]] = False
        assert inner.sum() > 100
        assert (img[..., 0][inner] == lbl[inner]).mean() > 0.99


def test_scale_one_without_flip_is_a_plain_crop_of_the_padded_arrays():
    image, label = self_encoding_pair(30, 50, block=5, seed=1)
    tf = no_jitter((40, 32), (1.0, 1.0), hflip=0.0)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        scale, (ox, oy), flip = tf.sample_params(image.shape[:2], np.random.default_rng(seed))
        img, lbl = tf.geometry(image, label, rng)
        # Written out: pad to at least the crop (image 0, label 255) at the bottom/right, then slice.
        pad_img = np.zeros((40, 50, 3), np.uint8)
        pad_img[:30] = image
        pad_lbl = np.full((40, 50), 255, np.uint8)
        pad_lbl[:30] = label
        np.testing.assert_array_equal(img, pad_img[oy:oy + 40, ox:ox + 32])
        np.testing.assert_array_equal(lbl, pad_lbl[oy:oy + 40, ox:ox + 32])
        assert not flip and scale == 1.0


def test_flip_mirrors_the_crop():
    image, label = self_encoding_pair(32, 48, block=4, seed=2)
    flipped = no_jitter((32, 32), (1.0, 1.0), hflip=1.0)
    plain = no_jitter((32, 32), (1.0, 1.0), hflip=0.0)
    img_f, lbl_f = flipped.geometry(image, label, np.random.default_rng(5))
    img_p, lbl_p = plain.geometry(image, label, np.random.default_rng(5))
    np.testing.assert_array_equal(img_f, img_p[:, ::-1])
    np.testing.assert_array_equal(lbl_f, lbl_p[:, ::-1])


def test_scale_two_label_is_pixel_repetition():
    _, label = self_encoding_pair(20, 30, block=3, seed=3)
    image = np.zeros((20, 30, 3), np.uint8)
    tf = no_jitter((16, 24), (2.0,), "choice", hflip=0.0)
    for seed in range(5):
        _, (ox, oy), _ = tf.sample_params(label.shape, np.random.default_rng(seed))
        _, lbl = tf.geometry(image, label, np.random.default_rng(seed))
        up = np.repeat(np.repeat(label, 2, 0), 2, 1)
        np.testing.assert_array_equal(lbl, up[oy:oy + 16, ox:ox + 24])


def test_small_scaled_image_is_padded_with_zero_and_ignore():
    image = np.full((10, 10, 3), 200, np.uint8)
    label = np.full((10, 10), 3, np.uint8)
    img, lbl = no_jitter((30, 40), (1.5,), "choice", hflip=0.0).geometry(image, label, np.random.default_rng(0))
    assert (lbl[:15, :15] == 3).all() and (lbl[15:] == 255).all() and (lbl[:, 15:] == 255).all()
    assert (img[:15, :15] == 200).all() and (img[15:] == 0).all() and (img[:, 15:] == 0).all()


def test_flipped_padding_moves_to_the_left():
    image = np.full((10, 10, 3), 200, np.uint8)
    label = np.full((10, 10), 3, np.uint8)
    img, lbl = no_jitter((10, 16), (1.0,), "choice", hflip=1.0).geometry(image, label, np.random.default_rng(0))
    assert (lbl[:, :6] == 255).all() and (lbl[:, 6:] == 3).all()
    assert (img[:, :6] == 0).all() and (img[:, 6:] == 200).all()


def test_discrete_scales_are_drawn_from_the_set():
    tf = no_jitter((8, 8), (0.75, 1.0, 1.25), "choice")
    drawn = {tf.sample_params((100, 100), np.random.default_rng(s))[0] for s in range(60)}
    assert drawn == {0.75, 1.0, 1.25}
    ranged = [no_jitter((8, 8), (0.75, 2.0)).sample_params((100, 100), np.random.default_rng(s))[0]
              for s in range(60)]
    assert min(ranged) >= 0.75 and max(ranged) <= 2.0 and len(set(ranged)) == 60


def test_same_seed_same_sample_and_output_types():
    image, label = self_encoding_pair(50, 70, block=7)
    tf = TrainTransform((32, 48), (0.75, 2.0))
    a_img, a_lbl = tf(image, label, np.random.default_rng(11))
    b_img, b_lbl = tf(image, label, np.random.default_rng(11))
    c_img, _ = tf(image, label, np.random.default_rng(12))
    # uint8 through the loader (a quarter of float32's bytes, an eighth of int64's), normalized on the device
    assert a_img.dtype == torch.uint8 and a_img.shape == (32, 48, 3)
    assert a_lbl.dtype == torch.uint8 and a_lbl.shape == (32, 48)
    assert torch.equal(a_img, b_img) and torch.equal(a_lbl, b_lbl)
    assert not torch.equal(a_img, c_img)
    assert set(a_lbl.unique().tolist()) <= set(range(19)) | {255}


def test_color_jitter_changes_color_not_geometry():
    image, label = self_encoding_pair(40, 40, block=8)
    jitter = TrainTransform((40, 40), (1.0,), "choice", 0.0, 0.4, 0.4, 0.4)
    img, lbl = jitter(image, label, np.random.default_rng(1))
    assert torch.equal(lbl, torch.from_numpy(label))
    assert not torch.equal(img, torch.from_numpy(image))


def test_normalize_formula():
    image = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    out = normalize(torch.from_numpy(image), MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 5, 7) and out.is_contiguous()
    expected = (torch.from_numpy(image).permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    last = normalize(torch.from_numpy(image), MEAN, STD, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)


def test_device_normalization_is_bit_for_bit_the_loader_workers_float32_formula():
    """What the workers computed before normalization moved to the device, written out in numpy float32:
    chw = float32(image) in CHW; chw *= 1 / (255 std); chw += -mean / std (one rounding per operation)."""
    mean, std = (0.3257, 0.3690, 0.3223), (0.2112, 0.2148, 0.2115)
    image = np.random.default_rng(5).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    chw *= (1 / (255 * np.asarray(std, np.float32))).astype(np.float32)[:, None, None]
    chw += (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)[:, None, None]
    out = normalize(torch.from_numpy(image)[None], mean, std)[0].numpy()
    assert np.abs(out - chw).max() == 0


def test_eval_transform_keeps_size_and_label():
    image = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    label = np.random.default_rng(1).integers(0, 19, (13, 17)).astype(np.uint8)
    img, lbl = EvalTransform()(image, label)
    assert img.dtype == torch.uint8 and torch.equal(img, torch.from_numpy(image))
    assert lbl.dtype == torch.uint8 and torch.equal(lbl, torch.from_numpy(label))


@pytest.mark.parametrize("scale", [0.8, 1.3])
def test_crop_of_non_integer_scale_matches_full_resize(scale):
    """Geometry against a second code path: cv2.resize of the whole image, then a slice."""
    rng = np.random.default_rng(4)
    image = cv2.GaussianBlur(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), (7, 7), 2)
    tf = no_jitter((24, 24), (scale,), "choice", hflip=0.0)
    for seed in range(5):
        _, (ox, oy), _ = tf.sample_params(image.shape[:2], np.random.default_rng(seed))
        img, _ = tf.geometry(image, np.zeros((60, 80), np.uint8), np.random.default_rng(seed))
        size = (round(80 * scale), round(60 * scale))
        full = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        ref = full[oy:oy + 24, ox:ox + 24].astype(int)
        # round(W * s) / W differs from s by < 1/W, which moves sample points by < 1/W of a pixel per pixel.
        assert np.abs(img.astype(int) - ref).max() <= 3


def test_color_jitter_equals_the_three_steps_written_out():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for seed in range(5):
        out = color_jitter(image, np.random.default_rng(seed), 0.4, 0.4, 0.4)
        rng = np.random.default_rng(seed)  # the same draws, in the same order
        b, c, s = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4)
        x = image.astype(np.float64) * b  # brightness
        x = (x - x.mean()) * c + x.mean()  # contrast around the mean intensity
        gray = x @ np.array([0.299, 0.587, 0.114])
        x = gray[..., None] + (x - gray[..., None]) * s  # saturation around each pixel's gray
        expected = np.clip(x, 0, 255)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert np.abs(out.astype(np.float64) - expected).max() < 0.75  # rounding to uint8 (+ float32)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_jitter_leaves_the_padding_black_and_uses_the_image_part_only(flip):
    # A 20x30 image, crop 32x40 at scale 1: rows 20.. and 10 columns (right, or left when flipped) are padding.
    image = np.random.default_rng(0).integers(30, 226, (20, 30, 3), dtype=np.uint8)
    label = np.zeros((20, 30), np.uint8)
    tf = TrainTransform((32, 40), (1.0,), "choice", flip, 0.4, 0.4, 0.4)
    img, lbl = tf(image, label, np.random.default_rng(3))
    pixels = img.double()
    cols = slice(10, 40) if flip else slice(0, 30)
    pad = torch.ones(32, 40, dtype=torch.bool)
    pad[:20, cols] = False
    assert (lbl[pad] == 255).all() and (lbl[~pad] == 0).all()
    assert pixels[pad].abs().max() < 1e-3, "padding must stay 0 after the color jitter"
    # The image part is the jitter of the (flipped) image alone: its mean, not the padding's, sets the contrast.
    rng = np.random.default_rng(3)
    tf.sample_params(image.shape[:2], rng)  # the same draws, in the same order
    expected = color_jitter(image[:, ::-1].copy() if flip else image, rng, 0.4, 0.4, 0.4)
    assert (pixels[:20, cols] - torch.from_numpy(expected).double()).abs().max() < 1e-3
