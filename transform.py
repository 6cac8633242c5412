"""Paired (image, label) transforms on numpy arrays.

Training: random scale, pad (image 0, label 255) where the scaled image is smaller than the crop,
random crop, horizontal flip, color jitter (of the image part, not the padding); the sample stays uint8 (image
HWC, class ids with 255 ignored) and normalize() makes the model's float input on the device.
Scale, pad, crop and flip are one affine map from crop pixels to source pixels, applied with a single
cv2.warpAffine per array: the cost is that of the crop, not of the scaled full image (a 2x-scaled
1024x2048 frame is never built).
Labels always use nearest-neighbour sampling.
"""

import cv2
import numpy as np
import torch

from cityscapes import IGNORE


def crop_matrix(scale, offset, flip, crop_w):
    """2x3 matrix mapping crop pixel (x, y) to source pixel coordinates, for cv2.WARP_INVERSE_MAP.

    Pixel centres are matched as cv2.resize does: output centre x + 0.5 lies at (x + 0.5 + ox) / scale in
    the source. With flip, crop column x takes the place of column crop_w - 1 - x.
    """
    ox, oy = offset
    m = np.array([[1 / scale, 0, (ox + 0.5) / scale - 0.5], [0, 1 / scale, (oy + 0.5) / scale - 0.5]])
    if flip:
        m[0, 2] += (crop_w - 1) / scale
        m[0, 0] = -m[0, 0]
    return m


def warp_pair(image, label, matrix, crop_hw, valid_hw, flip):
    """Image (bilinear) and label (nearest) sampled on the crop grid, and the (rows, cols) slices of the crop
    that lie on the image.

    Only the top-left `valid_hw` of the unflipped crop lies on the scaled image; the rest is padding
    (image 0, label 255). The image is warped with replicated borders so that its edge pixels are not
    blended with the padding, then the padding is written explicitly into both arrays.
    """
    size = (crop_hw[1], crop_hw[0])
    flags = cv2.WARP_INVERSE_MAP
    image = cv2.warpAffine(image, matrix, size, flags=flags | cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    label = cv2.warpAffine(label, matrix, size, flags=flags | cv2.INTER_NEAREST, borderValue=IGNORE)
    valid_h, valid_w = valid_hw
    pad_cols = slice(0, crop_hw[1] - valid_w) if flip else slice(valid_w, None)
    for array, fill in ((image, 0), (label, IGNORE)):
        array[valid_h:] = fill
        array[:, pad_cols] = fill
    valid_cols = slice(crop_hw[1] - valid_w, None) if flip else slice(0, valid_w)
    return image, label, (slice(0, valid_h), valid_cols)


GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # RGB luma weights (they sum to 1)


def color_jitter(image, rng, brightness, contrast, saturation):
    """Scale brightness, contrast (around the mean intensity) and saturation (around each pixel's gray).

    Applied one after the other these are, per pixel, x -> b x; y -> c (y - m) + m with m the mean of
    b x; z -> s z + (1 - s) gray(z). Their composition is one affine map of the RGB vector,
    c b (s I + (1 - s) 1 GRAY^T) x + (1 - c) m, which cv2.transform applies in a single pass over the
    uint8 image (saturating, so clipped to [0, 255] once, at the end).
    """
    b = rng.uniform(1 - brightness, 1 + brightness) if brightness > 0 else 1.0
    c = rng.uniform(1 - contrast, 1 + contrast) if contrast > 0 else 1.0
    s = rng.uniform(1 - saturation, 1 + saturation) if saturation > 0 else 1.0
    mean = b * float(image.mean()) if c != 1.0 else 0.0
    matrix = c * b * (s * np.eye(3) + (1 - s) * np.outer(np.ones(3), GRAY))
    return cv2.transform(image, np.hstack([matrix, np.full((3, 1), (1 - c) * mean)]))


def normalize(images, mean, std, channels_last=False):
    """uint8 RGB images (N, H, W, 3), as the loader ships them, -> float32 (N, 3, H, W), (x / 255 - mean) / std, on
    the images' device and in channels_last memory format where asked (the permuted uint8 batch has its strides
    already). Training and evaluation copy uint8 to the device and normalize there, as timm's PrefetchLoader does: a
    quarter of float32's bytes through the loader's shared and pinned memory. x * (1 / (255 std)) + (-mean / std) in
    float32, one rounding per operation: the values the loader workers computed before, bit for bit."""
    scale = (1 / (255 * np.asarray(std, np.float32))).astype(np.float32)
    shift = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    x = images.permute(0, 3, 1, 2).float()
    x = x * torch.from_numpy(scale).to(x.device)[:, None, None]
    x = x + torch.from_numpy(shift).to(x.device)[:, None, None]
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class TrainTransform:
    """The reference augmentation. Call as transform(image, label, rng) with a numpy Generator."""

    def __init__(self, crop_size, scales, scale_sampling="range", hflip=0.5, brightness=0.4, contrast=0.4,
                 saturation=0.4):
        self.crop_hw = tuple(int(c) for c in crop_size)
        self.scales, self.scale_sampling, self.hflip = tuple(scales), scale_sampling, hflip
        self.jitter = (brightness, contrast, saturation)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.crop_size, cfg.scales, cfg.scale_sampling, cfg.hflip, cfg.brightness, cfg.contrast,
                   cfg.saturation)

    def sample_params(self, image_hw, rng):
        """(scale, (ox, oy) crop offset in the scaled image, flip)."""
        if self.scale_sampling == "choice":
            scale = float(rng.choice(self.scales))
        else:
            scale = float(rng.uniform(min(self.scales), max(self.scales)))
        crop_h, crop_w = self.crop_hw
        # The scaled image is padded on the right/bottom up to the crop: offsets range over what is left.
        free_w = max(0, round(image_hw[1] * scale) - crop_w)
        free_h = max(0, round(image_hw[0] * scale) - crop_h)
        offset = (int(rng.integers(0, free_w + 1)), int(rng.integers(0, free_h + 1)))
        return scale, offset, bool(rng.random() < self.hflip)

    def warp(self, image, label, rng):
        """Scale, pad, crop and flip: uint8 image and label of the crop size, and the slices of the crop that lie
        on the image (the rest is padding)."""
        scale, (ox, oy), flip = self.sample_params(image.shape[:2], rng)
        crop_h, crop_w = self.crop_hw
        valid_hw = (min(crop_h, round(image.shape[0] * scale) - oy), min(crop_w, round(image.shape[1] * scale) - ox))
        matrix = crop_matrix(scale, (ox, oy), flip, crop_w)
        return warp_pair(image, label, matrix, self.crop_hw, valid_hw, flip)

    def geometry(self, image, label, rng):
        """Scale, pad, crop and flip (no color change): uint8 image and label of the crop size."""
        return self.warp(image, label, rng)[:2]

    def __call__(self, image, label, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        image, label, valid = self.warp(image, label, rng)
        # Jitter the image part only: the padding stays 0 and does not pull the contrast mean down.
        image[valid] = color_jitter(image[valid], rng, *self.jitter)
        return to_tensors(image, label)


def to_tensors(image, label):
    """(uint8 RGB image (H, W, 3), uint8 class ids (H, W), 255 ignored) as tensors: what a loader worker ships;
    normalize() makes the model's input of it on the device."""
    return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label, np.uint8))


class EvalTransform:
    """The whole image at its own size, as uint8 tensors (normalized on the device: normalize)."""

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def __call__(self, image, label, rng=None):
        return to_tensors(image, label)
