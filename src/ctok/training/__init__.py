"""Training: the shared run machinery and the trainers built on it.

* :mod:`~ctok.training.config`: YAML configs checked against dataclass schemas, ``key=value`` overrides.
* :mod:`~ctok.training.distributed`: torchrun process groups (gloo on CPU, NCCL on GPU).
* :mod:`~ctok.training.dist_timeout`: how long a collective waits (``run.dist_timeout_min``, ``--dist-timeout-min``).
* :mod:`~ctok.training.sharding`: the global batch split over processes and accumulation steps.
* :mod:`~ctok.training.schedule`: learning-rate warm-up and decay.
* :mod:`~ctok.training.checkpoint`: atomic, rotated checkpoints and random-generator states.
* :mod:`~ctok.training.run_log`: console, JSONL, TensorBoard and W&B logging.
* :mod:`~ctok.training.runner`: the loop itself, which every trainer plugs a task into.
* :mod:`~ctok.training.task`: what a task is, the typed losses its step returns, the modules it is handed.
* :mod:`~ctok.training.members`: each trained module's device copy, DDP wrapper, AdamW and EMA.
* :mod:`~ctok.training.generator`: SiT and DiT training on tokenizer latents
  (:mod:`~ctok.training.generator_data`: the latents it trains on).
* :mod:`~ctok.training.tokenizer`: SoftVQ-VAE and MAETok training.
"""
