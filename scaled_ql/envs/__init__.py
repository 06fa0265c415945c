"""Environments: Atari 2600 games with the DQN / Dopamine preprocessing (`atari.AtariEnv`)."""
from scaled_ql.envs.atari import AtariEnv, InvalidGameSettingError

__all__ = ['AtariEnv', 'InvalidGameSettingError']
