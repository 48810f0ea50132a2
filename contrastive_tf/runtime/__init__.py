"""Runtime helpers: the layer every other one stands on.

Owns how the package runs, not what it computes: compute precision
(`precision`), tf.distribute (`distribution`: strategies, replica-aware
helpers), atomic file writes (`files`), progress messages through logging
(`progress`), seeds (`seeds`), and every private Keras / TensorFlow API the
package relies on (`compat`). It imports nothing else from contrastive_tf.
"""
