"""The jobs: what experiments/ runs, one module per job.

`pretrain`, `finetune`, `distill`, `predict` and `pipeline` (the
semi-supervised pipeline) each turn a config (`config`: frozen dataclasses,
the one source of every flag and default) into a run folder; `models` is
the one place their models are built, `visualize` draws the pictures and
tables. The top layer: it may import every other (runtime, method, data,
runs, serving); nothing imports it but experiments/ and the package's
public API.
"""
