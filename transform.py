"""Paired (image, label) transforms on numpy arrays. Training: random scale, pad (image 0, label 255) up to the crop,
random crop, horizontal flip, color jitter of the image part (not the padding). Samples stay uint8 (image HWC, class
ids, 255 ignored); normalize() makes the float input on the device. Labels always use nearest-neighbour sampling.
"""

import cv2
import numpy as np
import torch

from datasets import IGNORE

GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # RGB luma weights (they sum to 1)


def color_jitter(image, rng, brightness, contrast, saturation):
    """Brightness x -> b x, contrast y -> c (y - m) + m (m: mean of b x), saturation z -> s z + (1 - s) gray(z),
    composed into one affine map c b (s I + (1 - s) 1 GRAY^T) x + (1 - c) m that cv2.transform applies in one pass
    over the uint8 image, clipping to [0, 255] once, at the end."""
    b = rng.uniform(1 - brightness, 1 + brightness) if brightness > 0 else 1.0
    c = rng.uniform(1 - contrast, 1 + contrast) if contrast > 0 else 1.0
    s = rng.uniform(1 - saturation, 1 + saturation) if saturation > 0 else 1.0
    mean = b * float(image.mean()) if c != 1.0 else 0.0
    matrix = c * b * (s * np.eye(3) + (1 - s) * np.outer(np.ones(3), GRAY))
    return cv2.transform(image, np.hstack([matrix, np.full((3, 1), (1 - c) * mean)]))


def normalize(images, mean, std, channels_last=False):
    """uint8 RGB images (N, H, W, 3) -> float32 (N, 3, H, W), (x / 255 - mean) / std, on their device (as timm's
    PrefetchLoader: uint8 is a quarter of float32's bytes through the loader), channels_last where asked. Computed as
    x * (1 / (255 std)) + (-mean / std), one float32 rounding per step: what the loader workers computed before."""
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
        scale = float(rng.choice(self.scales) if self.scale_sampling == "choice"
                      else rng.uniform(min(self.scales), max(self.scales)))
        # The scaled image is padded on the right/bottom up to the crop: offsets range over what is left.
        free_h, free_w = (max(0, round(side * scale) - crop) for side, crop in zip(image_hw, self.crop_hw, strict=True))
        offset = (int(rng.integers(0, free_w + 1)), int(rng.integers(0, free_h + 1)))
        return scale, offset, bool(rng.random() < self.hflip)

    def warp(self, image, label, rng):
        """Image (bilinear) and label (nearest) of the crop, and the (rows, cols) slices on the image (the rest is
        padding): one cv2.warpAffine per array, the cost of the crop, never of the scaled full image."""
        scale, (ox, oy), flip = self.sample_params(image.shape[:2], rng)
        crop_h, crop_w = self.crop_hw
        valid_h = min(crop_h, round(image.shape[0] * scale) - oy)
        valid_w = min(crop_w, round(image.shape[1] * scale) - ox)
        # Pixel centres matched as cv2.resize does: crop centre x + 0.5 lies at (x + 0.5 + ox) / scale in the source.
        # With flip, crop column x takes the place of column crop_w - 1 - x.
        matrix = np.array([[1 / scale, 0, (ox + 0.5) / scale - 0.5], [0, 1 / scale, (oy + 0.5) / scale - 0.5]])
        if flip:
            matrix[0, 2] += (crop_w - 1) / scale
            matrix[0, 0] = -matrix[0, 0]
        # Replicated borders keep the image's edge pixels from blending with the padding, written below.
        flags, size = cv2.WARP_INVERSE_MAP, (crop_w, crop_h)
        image = cv2.warpAffine(image, matrix, size, flags=flags | cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        label = cv2.warpAffine(label, matrix, size, flags=flags | cv2.INTER_NEAREST, borderValue=IGNORE)
        for array, fill in ((image, 0), (label, IGNORE)):  # only the top-left valid part of the unflipped crop is image
            array[valid_h:] = fill
            array[:, slice(0, crop_w - valid_w) if flip else slice(valid_w, None)] = fill
        return image, label, (slice(0, valid_h), slice(crop_w - valid_w, None) if flip else slice(0, valid_w))

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
    """(uint8 RGB image (H, W, 3), uint8 class ids (H, W)) as tensors: what a loader worker ships."""
    return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label, np.uint8))


class EvalTransform:
    """The whole image at its own size, as uint8 tensors (normalized on the device: normalize)."""

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def __call__(self, image, label, rng=None):
        return to_tensors(image, label)
