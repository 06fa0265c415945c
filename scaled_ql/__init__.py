"""scaled-ql: scaled offline Q-learning on multi-game Atari (Kumar et al., ICLR 2023)."""
__version__ = '0.1.0'
