"""scaled-ql: scaled offline Q-learning on multi-game Atari (Kumar et al., ICLR 2023)."""
from scaled_ql import host_memory as _host_memory

__version__ = '0.1.0'

# Before any TensorFlow or XLA allocation of this process: see host_memory (opt out with
# SCALED_QL_KEEP_FREED_MEMORY=0).
_host_memory.apply_from_environment()
