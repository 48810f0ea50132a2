"""Serving: SavedModels in TF Serving's layout.

Owns writing an encoder or classifier as `<root>/<name>/<version>/` with
its signatures (`export`; the endpoints themselves, with the request-side
parsing of encoded images, in `signatures`) and loading an export back for
fine-tuning. The layout's file names and the read side (model card, Keras
copy) are `contrastive_tf.runs.artifacts`'. May import runtime, method and
runs.
"""
