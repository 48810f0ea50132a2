"""Runs: the artifacts a job reads and writes.

Owns what a pretraining, fine-tuning or distillation run folder and an
export version folder hold, how each is recognised and loaded, and their
errors (`artifacts`); and checkpoints that are written whole, never of a
non-finite state and resumed only into the same model (`checkpoints`);
the published SimCLR models read (`simclr_source`) and rebuilt as this
package's own (`simclr_import`).
May import runtime, method and data; never serving or jobs.
"""
