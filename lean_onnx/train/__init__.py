"""Stage 5, training: the ONNX -> torch bridge and its op table (`ops/`), fine-tuning with pruned kernels
held at zero, the iterative prune / fine-tune schedule, and the Circle-Square data of the paper.

Takes models and data; gives fine-tuned models. torch is imported only when a function needs it.
Imports the stages below (`runtime`, `rewrite`, `select`, `graph`, `io`).
"""
