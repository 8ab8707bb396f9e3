"""The SCOT pipeline: hyperpixels, CAM marginals, OT, RHM, keypoint transfer."""

from .hyperpixels import Hyperpixels, HyperpixelExtractor
from .image import ImageError, load_image
from .scot import SCOT, Correspondence, cosine_cost

__all__ = ["SCOT", "Correspondence", "Hyperpixels", "HyperpixelExtractor", "ImageError",
           "cosine_cost", "load_image"]
