"""Readers of prepared shards: `torch_reader` (decoded splits, DataLoaders), `stream_reader`
(Ray-free streaming of source-encoded shards), `ray_reader` (Ray Data, the Ray Train workers'
input; the only module here that imports Ray), `ray_progress` (the key of Ray Data's bars-off
notice, readable without importing Ray), the per-image augmentation (`transforms`) and the
whole-batch augmentation on the training device (`batch_augment`)."""
