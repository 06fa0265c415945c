"""How well a game's replay table mixes its data selection (issue 15, item 5).

The paper samples uniformly from each game's selected data. Here a game's Reverb table is a FIFO
shuffle buffer (uniform sampler, `DataConfig.shuffle_buffer_per_game` items) fed by the RLDS
reader's stream. `measure` runs that arrangement for real, at the sizes of a config, and compares
what a learner samples with uniform sampling over the selection:

    stats = mixing.measure(cfg, 'Pong', window_steps=1000)
    stats.checkpoint_coverage   # fraction of the selected checkpoints sampled in the window
    stats.ks_checkpoint         # KS distance: sampled checkpoint index vs uniform selection

How: a real Reverb table with the game table's sampler, remover, size and rate limiter, whose items
are (checkpoint_id, episode_id, step index, insertion number) instead of frames, is filled from
`rlds_reader.episodes_from_config` (the inserter's reader, same seed and options), one item per
transition, whole episodes at a time, as the inserter writes them. Once the table is full, each
learner step samples this game's share of a stratified batch (games_per_batch draws with
replacement over the config's games, transitions_per_game each) and the inserter's throttle
(`DataConfig.samples_per_insert`, nodes.InserterNode) lets the next episode in once the samples
since the table filled reach samples_per_insert x the transitions inserted since. The window
starts after `burn_in_steps` learner steps.

Reference ("uniform over the selection"): every transition of the selection equally likely; its
checkpoint index and its position in the selection (checkpoint, episode_id, step order, the "age"
of the data in the DQN run, 0..1) come from one pass over the selection (`selection_index`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from scaled_ql.configs.base import ExperimentConfig

TABLE = 'mixing'
_COLUMNS = ('checkpoint', 'episode', 'seq', 'step')  # sorted: the order tf.nest flattens them


@dataclasses.dataclass(frozen=True)
class SelectionIndex:
  """Transitions per episode of a game's selection, in the selection's order."""
  checkpoints: np.ndarray  # int [E] checkpoint_id of each episode, sorted by (checkpoint, episode)
  episodes: np.ndarray  # int [E] episode_id
  transitions: np.ndarray  # int [E] transitions (RLDS steps - 1) of each episode

  @property
  def total(self) -> int:
    return int(self.transitions.sum())

  @property
  def selected_checkpoints(self) -> list[int]:
    return sorted(set(self.checkpoints.tolist()))

  def checkpoint_weights(self) -> dict[int, float]:
    """Probability of each checkpoint under uniform sampling of the selection's transitions."""
    return {c: float(self.transitions[self.checkpoints == c].sum()) / self.total
            for c in self.selected_checkpoints}

  def start_of(self) -> dict[tuple[int, int], int]:
    """(checkpoint_id, episode_id) -> number of the selection's transitions before it."""
    starts = np.concatenate([[0], np.cumsum(self.transitions)[:-1]])
    return {(int(c), int(e)): int(s)
            for c, e, s in zip(self.checkpoints, self.episodes, starts)}


def _episode_meta(dataset):
  import tensorflow as tf
  return dataset.map(lambda ep: (tf.cast(ep['checkpoint_id'], tf.int64),
                                 tf.cast(ep['episode_id'], tf.int64),
                                 ep['steps'].cardinality() - 1))


def selection_index(cfg: ExperimentConfig, game: str, seed: int = 0) -> SelectionIndex:
  """One pass over `game`'s selection under `cfg.data` (reads every episode once)."""
  from scaled_ql.datasets import rlds_reader
  ds = rlds_reader.episodes_from_config(cfg.data, game, repeat=False, seed=seed,
                                        shuffle_files=False)
  rows = sorted((int(c), int(e), int(n)) for c, e, n in _episode_meta(ds).as_numpy_iterator())
  if not rows:
    raise ValueError(f'{game}: the selection {cfg.data.selection!r} in {cfg.data.data_dir} '
                     'is empty')
  c, e, n = (np.asarray(x, np.int64) for x in zip(*rows))
  return SelectionIndex(checkpoints=c, episodes=e, transitions=n)


@dataclasses.dataclass
class MixingStats:
  game: str
  window_steps: int
  samples: int  # transitions this game sampled in the window
  selected_checkpoints: int
  sampled_checkpoints: int
  checkpoint_coverage: float  # sampled / selected checkpoints
  ks_checkpoint: float  # KS distance: sampled checkpoint index vs uniform over the selection
  ks_position: float  # KS distance: position in the selection (0..1) vs uniform
  mean_position: float  # mean position in the selection of sampled transitions (uniform: 0.5)
  distinct_episodes: int  # episodes the window's samples came from
  uniform_distinct_episodes: float  # expected, for as many uniform samples of the selection
  selection_episodes: int
  buffer_age_mean: float  # transitions inserted after a sampled one, before it was sampled
  buffer_size: int
  inserted: int  # transitions inserted in all (fill + burn-in + window)

  def passes(self, coverage: float = 0.8, ks: float = 0.1) -> bool:
    """Issue 15's "close to uniform": >= 80% of the checkpoints and KS <= 0.1."""
    return self.checkpoint_coverage >= coverage and self.ks_checkpoint <= ks

  def row(self) -> str:
    return (f'| {self.game} | {self.selected_checkpoints} | {self.sampled_checkpoints} '
            f'({self.checkpoint_coverage:.0%}) | {self.ks_checkpoint:.3f} | {self.ks_position:.3f} '
            f'| {self.mean_position:.3f} | {self.distinct_episodes} / '
            f'{self.uniform_distinct_episodes:.0f} | {self.buffer_age_mean:.0f} / '
            f'{self.buffer_size} | {self.samples} |')


HEADER = ('| game | selected ckpts | sampled ckpts | KS ckpt | KS position | mean position | '
          'episodes (uniform) | buffer age / size | samples |\n'
          '|---|---|---|---|---|---|---|---|---|')


def ks_discrete(sampled: np.ndarray, weights: dict[int, float]) -> float:
  """Kolmogorov-Smirnov distance between the empirical distribution of `sampled` values and the
  discrete distribution `weights` ({value: probability}), over the values' order."""
  values = sorted(weights)
  counts = np.asarray([np.count_nonzero(sampled == v) for v in values], np.float64)
  if len(sampled) != counts.sum():
    raise ValueError('sampled values outside the reference distribution')
  empirical = np.cumsum(counts) / max(len(sampled), 1)
  reference = np.cumsum([weights[v] for v in values])
  return float(np.max(np.abs(empirical - reference)))


def ks_uniform(u: np.ndarray) -> float:
  """KS distance between the empirical distribution of `u` and Uniform(0, 1)."""
  u = np.sort(np.asarray(u, np.float64))
  n = len(u)
  if n == 0:
    return 1.0
  i = np.arange(1, n + 1)
  return float(max(np.max(i / n - u), np.max(u - (i - 1) / n)))


def _make_table(cfg: ExperimentConfig):
  import reverb
  import tensorflow as tf
  data = cfg.data
  signature = {k: tf.TensorSpec((1,), tf.int64, name=k) for k in _COLUMNS}
  return reverb.Table(name=TABLE, sampler=reverb.selectors.Uniform(),
                      remover=reverb.selectors.Fifo(), max_size=data.shuffle_buffer_per_game,
                      rate_limiter=reverb.rate_limiters.MinSize(data.min_fill_per_game),
                      signature=signature)


def measure(cfg: ExperimentConfig, game: str, *, window_steps: int = 1000,
            burn_in_steps: int = 0, seed: int = 0, index: Optional[SelectionIndex] = None,
            reader_kwargs: Optional[dict] = None) -> MixingStats:
  """Mixing statistics of `game`'s table over `window_steps` learner steps (module docstring).

  `reader_kwargs` go to `rlds_reader.episodes_from_config` (e.g. cycle_length).
  """
  import reverb
  if game not in cfg.games:
    raise ValueError(f'game {game!r} is not one of the config games {cfg.games}')
  index = index or selection_index(cfg, game, seed)
  start_of, total = index.start_of(), index.total
  data, agent = cfg.data, cfg.agent
  rng = np.random.default_rng(seed)

  from scaled_ql.datasets import rlds_reader
  stream = _episode_meta(rlds_reader.episodes_from_config(
      data, game, repeat=True, seed=seed, **(reader_kwargs or {}))).as_numpy_iterator()
  from scaled_ql.datasets import reverb_tables
  server = reverb_tables.server_with_tables([_make_table(cfg)])
  client = reverb.Client(f'localhost:{server.port}')
  writer = client.trajectory_writer(num_keep_alive_refs=1)
  inserted = 0

  def insert_episode() -> None:
    nonlocal inserted
    c, e, n = next(stream)
    for t in range(int(n)):
      writer.append(dict(checkpoint=c, episode=e, step=np.int64(t), seq=np.int64(inserted)))
      writer.create_item(TABLE, 1.0, {k: writer.history[k][-1:] for k in _COLUMNS})
      inserted += 1
      if inserted % 16 == 0:
        writer.flush()
    writer.flush()

  try:
    while inserted < data.shuffle_buffer_per_game:  # the inserter fills the table unthrottled
      insert_episode()
    full_at, sampled_since_full = inserted, 0
    rows = []
    for step in range(burn_in_steps + window_steps):
      draws = rng.binomial(agent.games_per_batch, 1.0 / len(cfg.games))
      k = draws * agent.transitions_per_game
      if k:
        # Sampled columns come flattened in tf.nest order (sorted keys).
        got = [dict(zip(_COLUMNS, (int(np.ravel(x)[0]) for x in s[0].data)))
               for s in client.sample(TABLE, num_samples=k)]
        sampled_since_full += k
        if step >= burn_in_steps:
          rows += [(d['checkpoint'], d['episode'], d['step'], inserted - 1 - d['seq'])
                   for d in got]
      while sampled_since_full >= data.samples_per_insert * (inserted - full_at):
        insert_episode()  # the throttle lets the next whole episode in
  finally:
    writer.close()
    server.stop()

  arr = np.asarray(rows, np.int64).reshape(-1, 4)
  ckpts = arr[:, 0]
  position = np.asarray([(start_of[(c, e)] + t + 0.5) / total for c, e, t, _ in rows])
  distinct = len({(c, e) for c, e, _, _ in rows})
  p = index.transitions / total
  uniform_distinct = float(np.sum(1.0 - (1.0 - p) ** len(rows)))
  selected = index.selected_checkpoints
  sampled = len(set(ckpts.tolist()))
  return MixingStats(
      game=game, window_steps=window_steps, samples=len(rows), selected_checkpoints=len(selected),
      sampled_checkpoints=sampled, checkpoint_coverage=sampled / len(selected),
      ks_checkpoint=ks_discrete(ckpts, index.checkpoint_weights()),
      ks_position=ks_uniform(position),
      mean_position=float(position.mean()) if len(rows) else float('nan'),
      distinct_episodes=distinct, uniform_distinct_episodes=uniform_distinct,
      selection_episodes=len(index.transitions),
      buffer_age_mean=float(arr[:, 3].mean()) if len(rows) else float('nan'),
      buffer_size=data.shuffle_buffer_per_game, inserted=inserted)
