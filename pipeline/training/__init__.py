"""Ray-free training: one run's state and epochs (`session`), the one epoch loop (`fit`) that
both drivers share, the Ray-free CLI driver (`engine`), complete weights-only checkpoints
(`checkpoint`), the LR schedule (`schedule`) and the CUDA-graph training step
(`cuda_graph_step`). Imports neither Ray nor MLflow."""
