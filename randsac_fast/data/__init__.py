"""Data: image sources, the MAE augmentation in uint8, and deterministic, resumable batch streams.

Sources (``sources.py``; ``open_source`` resolves ``--data``):
  ``digits``     scikit-learn's bundled 8x8 handwritten digits (1797 images, no download);
  ``synthetic``  random images, for benchmarks;
  a directory    CIFAR-10/100 python pickles (``data_batch_1`` or ``train`` + ``meta``) or an
                 ImageFolder tree (``DIR/class/image.jpg``);
  tar shards     ``'shards/train-{000000..001023}.tar'`` (WebDataset layout, ``shards.py``; write
                 them with ``python -m randsac_fast.data make-shards SRC_DIR OUT_DIR``).

Files are decoded in uint8 at the resolution the crop needs (``images.py``), augmented per sample
with generators seeded by (seed, epoch, index) (``transforms.py``), and batched by one DataLoader
that lives for the whole run and resumes at the exact micro-batch (``loader.py``).
"""
from .images import DataError, EncodedImage, UnreadableImage, dct_factor, decode_rgb, jpeg_decoder, rgb_uint8
from .loader import (AugmentedDataset, BatchStream, ShardedBatches, auto_workers, batch_stream, collate,
                     resolve_workers)
from .shards import ShardDataset, make_shards, resume_changes
from .sources import (CIFAR_MEAN, CIFAR_STD, IMAGE_EXTS, IMAGENET_MEAN, IMAGENET_STD, ImageFolderSource,
                      ShardSource, SyntheticSource, TensorSource, cifar, digits, is_shard_spec, open_source,
                      pretraining_root, read_cifar_pickle)
from .transforms import Augment, augment_sample, crop_box, eval_images, normalize, resize, sample_seed

__all__ = ["open_source", "pretraining_root", "Augment", "ShardedBatches", "batch_stream", "eval_images", "DataError",
           "UnreadableImage", "EncodedImage", "ShardSource", "make_shards", "resolve_workers", "BatchStream",
           "resume_changes"]
