"""Training: the shared run machinery and the trainers built on it.

* :mod:`~ctok.training.config`: YAML configs checked against dataclass schemas, ``key=value`` overrides.
* :mod:`~ctok.training.distributed`: torchrun process groups (gloo on CPU, NCCL on GPU).
* :mod:`~ctok.training.sharding`: the global batch split over processes and accumulation steps.
* :mod:`~ctok.training.schedule`: learning-rate warm-up and decay.
* :mod:`~ctok.training.checkpoint`: atomic, rotated checkpoints and random-generator states.
* :mod:`~ctok.training.run_log`: console, JSONL, TensorBoard and W&B logging.
* :mod:`~ctok.training.runner`: the loop itself, which every trainer plugs a ``training_step`` into.
* :mod:`~ctok.training.generator`: SiT and DiT training on tokenizer latents.
"""
