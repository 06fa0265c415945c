"""PNG figures: performance profiles and learning curves. Headless (matplotlib 'Agg')."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use('Agg', force=True)  # files only; never needs a display
  import matplotlib.pyplot as plt
  return plt


def performance_profile_png(path: str, profiles: Mapping[str, np.ndarray],
                            cis: Mapping[str, np.ndarray], taus: np.ndarray,
                            title: str = '') -> str:
  """Fraction of runs x games with human-normalized score > tau, one line (+95% CI band) each.

  Drawn like rliable's `plot_utils.plot_performance_profiles`, without its seaborn import.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  taus = np.asarray(taus)
  for name, profile in profiles.items():
    line, = ax.plot(taus, profile, linewidth=2, label=name)
    lower, upper = cis[name]
    ax.fill_between(taus, lower, upper, color=line.get_color(), alpha=0.15)
  ax.axvline(1.0, color='grey', linestyle=':', linewidth=1)
  ax.set_xlabel(r'Human-normalized score ($\tau$)')
  ax.set_ylabel(r'Fraction of runs with score $> \tau$')
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(loc='upper right', fontsize='small')
  if title:
    ax.set_title(title)
  fig.tight_layout()
  _save(fig, path)
  return path


def learning_curves_png(path: str, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                        ylabel: str, title: str = '', percent: bool = True) -> str:
  """One line per name: curves[name] = (learner steps, values); values are fractions of human."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  scale = 100.0 if percent else 1.0
  for name, (steps, values) in curves.items():
    ax.plot(np.asarray(steps), np.asarray(values, np.float64) * scale, marker='o', markersize=3,
            label=name)
  ax.set_xlabel('learner step (param_version)')
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if len(curves) > 1:
    ax.legend(loc='best', fontsize='small', ncol=1 + len(curves) // 12)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  _save(fig, path)
  return path


def per_game_grid_png(path: str, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                      ylabel: str = 'human-normalized (%)', title: str = '',
                      percent: bool = True,
                      references: Optional[Mapping[str, Mapping[str, float]]] = None) -> str:
  """One small panel per game (readable for 40 games): curves[game] = (learner steps, values);
  a game with no point says 'no completed episode'. references[game] = {label: value}: dashed
  horizontal lines in the same units as the values (e.g. the data's behaviour score)."""
  plt = _pyplot()
  n = len(curves)
  if n == 0:
    raise ValueError('per_game_grid_png: no games to plot')
  cols = min(n, 6)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows + 0.6), squeeze=False)
  scale = 100.0 if percent else 1.0
  for ax, (name, (steps, values)) in zip(axes.flat, curves.items()):
    if len(steps):
      ax.plot(np.asarray(steps), np.asarray(values, np.float64) * scale, marker='o', markersize=2)
    else:  # a game without any completed episode has no score to plot
      ax.text(0.5, 0.5, 'no completed episode', ha='center', va='center', fontsize='small',
              transform=ax.transAxes)
    lines = (references or {}).get(name, {})
    for k, (label, value) in enumerate(lines.items()):
      ax.axhline(value * scale, linestyle='--', linewidth=1, color=f'C{k + 1}', label=label)
    if lines:
      ax.legend(fontsize='xx-small', loc='best')
    ax.set_title(name, fontsize='small')
    ax.tick_params(labelsize='x-small')
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[n:]:
    ax.axis('off')
  fig.supxlabel('learner step (param_version)', fontsize='small')
  fig.supylabel(ylabel, fontsize='small')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)
  return path


def _save(fig, path: str) -> None:
  plt = _pyplot()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
