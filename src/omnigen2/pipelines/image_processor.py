"""Reference-image preprocessing: OmniGen2's resizing rules on top of diffusers' VaeImageProcessor."""

from __future__ import annotations

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor


class OmniGen2ImageProcessor(VaeImageProcessor):
    """Resizes a reference image to at most ``max_pixels`` and ``max_side_length``, never upscaling, with both
    sides floored to a multiple of ``vae_scale_factor`` (= VAE downsampling x patch size), Lanczos, then
    normalises to [-1, 1] as the original does."""

    def __init__(self, vae_scale_factor: int = 16):
        super().__init__(do_resize=True, vae_scale_factor=vae_scale_factor, resample="lanczos", do_normalize=True)

    def target_size(self, height: int, width: int, max_pixels: int, max_side_length: int | None) -> tuple[int, int]:
        side_ratio = min(max_side_length / height, max_side_length / width) if max_side_length else 1.0
        ratio = min((max_pixels / (height * width)) ** 0.5, side_ratio, 1.0)
        m = self.config.vae_scale_factor
        new_h, new_w = int(height * ratio) // m * m, int(width * ratio) // m * m
        if new_h < m or new_w < m:
            raise ValueError(
                f"a {width}x{height} image would shrink to {new_w}x{new_h} under max_pixels={max_pixels} and "
                f"max_side_length={max_side_length}; it needs at least {m} pixels per side"
            )
        return new_h, new_w

    def preprocess_reference(
        self, image: PIL.Image.Image, max_pixels: int, max_side_length: int | None
    ) -> torch.Tensor:
        """PIL RGB image -> (1, 3, H, W) float in [-1, 1]."""
        h, w = self.target_size(image.height, image.width, max_pixels, max_side_length)
        image = self.resize(image, h, w)
        return self.normalize(self.numpy_to_pt(self.pil_to_numpy([image])))
