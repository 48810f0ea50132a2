"""The method: SimCLR / SimCLRv2 as Keras layers, models and losses.

Owns the two-view augmentation (`augment`, with `color` and `crop`), the
ResNet encoders (`backbones`, fast kernels in `kernels`), the projection
head (`heads`), NT-Xent and the distillation loss (`losses`), the
contrastive model (`model`), the classifier built on an encoder
(`classifier`), the distillation model (`distiller`), LARS and the
schedule (`optim`) and the frozen-feature evaluations (`evaluation`: linear
probe, kNN). Everything here works on tensors and Keras objects; it may
import `contrastive_tf.runtime` only -- no files, datasets or jobs.
"""
