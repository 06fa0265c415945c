"""The offline data path: RL Unplugged / DQN-Replay episodes as TFDS (RLDS) datasets.

Importing this package hides every GPU from TensorFlow, so that tf.data never takes accelerator
memory from JAX (TensorFlow is only the data reader here).
"""
import logging as _logging

import tensorflow as _tf

try:
  _tf.config.set_visible_devices([], 'GPU')
except RuntimeError as _e:  # TF was already initialised by someone else: say so, loudly
  _logging.getLogger(__name__).warning(
      'could not hide GPUs from TensorFlow (already initialised: %s); tf.data may use '
      'accelerator memory', _e)
