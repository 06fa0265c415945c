"""Local DQN-Replay-like data: play the real emulator and write an `rlu_atari_checkpoints_ordered`
TFDS dataset that `tfds.builder(...)` and `rlds_reader` cannot tell from RL Unplugged's.

    from scaled_ql.datasets import generate
    generate.generate(['Pong', 'Breakout'], 'data/generated', run=1, num_checkpoints=10,
                      steps_per_checkpoint=5_000, seed=0)

Each "checkpoint" split is a mixture of policies of rising quality, as the checkpoints of a DQN
run are: every episode draws a skill, hence an epsilon between 1.0 and 0.05, from
`policies.SkillSchedule` (a share of "late policy" episodes that grows across the splits, the rest
spread between random play and the late policy) and is played epsilon-greedily over the game's
scripted heuristic (`policies.py`), with sticky actions 0.25 as in DQN-Replay. So the early splits
(the `suboptimal` selection) are worse on average than the last ones, yet hold some good episodes.
With `skill=SkillSchedule(weak='flawed')` (`--weak-episodes flawed`) the weaker episodes play the
script with one consistent mistake (`policies.FLAWED`) at epsilon 0.05 instead.
Episodes are always whole (game over, or the `max_episode_frames` cap): the episode under way when
a split's step budget runs out is played to its end.

The dataset is written by the registered TFDS builder itself (same name, config `{Game}_run_{r}`,
version, feature spec, split names, file naming and dataset_info.json); only its split generators
are replaced by our episodes. Per step we store, as the real data does, the newest single 84x84x1
frame and the clipped reward; `episode_return` is the sum of clipped rewards. How each split was
made (policy, per-episode epsilons, raw returns) and its behaviour scores per split and selection
(`behaviour`) go into `generation_info.json` beside dataset_info.json.

Episodes follow RLDS (and the TFDS conversion of DQN-Replay, `atari_utils.atari_example_to_rlds`):
step t holds o_t, a_t, r_t = clip(reward of a_t), discount_t (0 if a_t ended the game, else 1);
one extra last step holds the final observation o_T with action 0, reward 0, is_last=True,
is_terminal=True and discount 0 on game over; on truncation by the episode frame cap
is_terminal=False and discount 1.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np

from scaled_ql import games as games_lib
from scaled_ql.datasets import policies
from scaled_ql.datasets import tfds_layout
from scaled_ql.envs.atari import MAX_EPISODE_FRAMES, AtariEnv

log = logging.getLogger(__name__)

STICKY_ACTION_PROB = 0.25  # DQN-Replay (Agarwal et al. 2020) logged with sticky actions
GENERATOR = 'scaled_ql.datasets.generate'  # generation_info.json's `generator` for our data


@dataclasses.dataclass
class SplitStats:
  """What made one split and what it holds (written to generation_info.json).

  Every episode is whole: it ended by game over (`terminated`) or by the `max_episode_frames` cap,
  never by the split's step budget, so every return below is a completed episode's score.
  """
  checkpoint_id: int
  policy: str
  env_seed: int
  expert_fraction: float  # probability that an episode is played by the late policy (skill 1)
  mean_skill: float  # expected per-episode skill (policies.SkillSchedule)
  epsilon: float = float('nan')  # mean of the per-episode epsilons (filled as episodes are played)
  steps: int = 0  # agent steps (actions) stored
  episodes: int = 0
  terminated_episodes: int = 0  # ended by game over (the rest hit the frame cap)
  raw_returns: list = dataclasses.field(default_factory=list)  # unclipped game score, per episode
  clipped_returns: list = dataclasses.field(default_factory=list)
  episode_epsilons: list = dataclasses.field(default_factory=list)
  # per episode: probability of the script's action at a greedy step (1 unless skill.weak is
  # 'flawed'; the rest go to the game's flawed script)
  episode_script_probs: list = dataclasses.field(default_factory=list)
  episode_steps: list = dataclasses.field(default_factory=list)


# zlib level 6 (TF's encode_png default): ~320 bytes per frame vs ~410 at cv2's default level 1,
# at about the same speed.
_PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 6)


def encode_png(frame: np.ndarray) -> bytes:
  """A grey uint8 [84, 84] frame as PNG bytes (cv2: ~10x faster than TFDS's eager TF encoder;
  lossless, so the decoded `observation` is the same)."""
  ok, buf = cv2.imencode('.png', np.asarray(frame, np.uint8), _PNG_PARAMS)
  if not ok:
    raise RuntimeError('cv2.imencode failed on a frame')
  return buf.tobytes()


def rlds_episode(frames, actions, rewards, terminal: bool, checkpoint_id: int,
                     episode_id: int) -> dict:
  """One RLDS episode in the rlu_atari feature layout from T actions and T+1 frames (uint8 [84, 84]
  arrays or their PNG bytes)."""
  num_actions = len(actions)
  assert len(frames) == num_actions + 1, (len(frames), num_actions)
  clipped = np.clip(np.asarray(rewards, np.float32), -1.0, 1.0)
  reward = np.concatenate([clipped, [0.0]]).astype(np.float32)
  discount = np.ones(num_actions + 1, np.float32)
  if terminal:
    discount[-2:] = 0.0  # the step into the terminal state, and the terminal state itself
  is_first = np.zeros(num_actions + 1, bool)
  is_first[0] = True
  is_last = np.zeros(num_actions + 1, bool)
  is_last[-1] = True
  is_terminal = np.zeros(num_actions + 1, bool)
  is_terminal[-1] = terminal
  return {
      'checkpoint_id': np.int64(checkpoint_id),
      'episode_id': np.int64(episode_id),
      'episode_return': np.float32(clipped.sum()),
      'steps': {
          'observation': [f if isinstance(f, bytes) else encode_png(f) for f in frames],
          'action': np.concatenate([np.asarray(actions, np.int64), [0]]).astype(np.int64),
          'reward': reward,
          'discount': discount,
          'is_first': is_first,
          'is_last': is_last,
          'is_terminal': is_terminal,
      },
  }


def play_split(game: str, stats: SplitStats, *, num_checkpoints: int,
               skill: policies.SkillSchedule, skill_start: float,
               steps_per_checkpoint: Optional[int],
               episodes_per_checkpoint: Optional[int], max_episode_frames: int,
               on_step=None) -> Iterator[dict]:
  """Yields the whole episodes of one split; fills `stats`. Exactly one budget must be given.

  A step budget is a minimum: episodes are started while fewer than `steps_per_checkpoint` steps
  are stored, and the one under way when the budget is reached is played to its end (game over or
  the frame cap), so no episode is cut and a split holds up to one episode more than its budget.
  Each episode draws its own skill, hence epsilon, from `skill` (policies.SkillSchedule), with
  `skill_start` the game's start of the stratified quantile sequence.
  """
  if (steps_per_checkpoint is None) == (episodes_per_checkpoint is None):
    raise ValueError('give exactly one of steps_per_checkpoint / episodes_per_checkpoint')
  env = AtariEnv(game, sticky_action_prob=STICKY_ACTION_PROB,
                 max_episode_frames=max_episode_frames, seed=stats.env_seed)
  rng = np.random.default_rng(stats.env_seed)
  skills = skill.split_skills(skill_start, stats.checkpoint_id, num_checkpoints)
  policy = policies.EpsilonGreedyHeuristic(env, 1.0, rng, flawed=skill.weak == 'flawed')
  while True:
    if steps_per_checkpoint is not None and stats.steps >= steps_per_checkpoint:
      return
    if episodes_per_checkpoint is not None and stats.episodes >= episodes_per_checkpoint:
      return
    u = next(skills)
    epsilon, script_prob = skill.epsilon(u), skill.script_prob(u)
    policy.set_episode(epsilon, script_prob)
    ts = env.reset()
    # Frames are PNG-encoded as they come (~1-2 KB each instead of 7 KB: long episodes stay small).
    frames, actions, rewards = [encode_png(ts.observation[..., -1])], [], []
    while True:
      a = policy()
      ts = env.step(a)
      frames.append(encode_png(ts.observation[..., -1]))
      actions.append(a)
      rewards.append(float(ts.reward))
      if on_step is not None:
        on_step()
      if ts.last():
        break
    terminal = bool(ts.discount == 0.0)
    episode_id = stats.episodes
    stats.steps += len(actions)
    stats.episodes += 1
    stats.terminated_episodes += int(terminal)
    stats.raw_returns.append(float(np.sum(rewards)))
    stats.clipped_returns.append(float(np.clip(rewards, -1, 1).sum()))
    stats.episode_epsilons.append(round(epsilon, 4))
    stats.episode_script_probs.append(round(script_prob, 4))
    stats.episode_steps.append(len(actions))
    stats.epsilon = float(np.mean(stats.episode_epsilons))
    yield rlds_episode(frames, actions, rewards, terminal, stats.checkpoint_id, episode_id)


def behaviour(game: str, splits: dict) -> dict:
  """Behaviour scores of a generated dataset from its generation_info `splits`.

  Per split and per selection (`suboptimal`: the first 20% of the splits, as the reader selects;
  `near_optimal`: all): the mean raw game score of the completed episodes, its human-normalized
  value, the median and the episode count; `best_split` is the split with the highest mean score,
  `epsilon_1` the episodes played uniformly at random (our random reference),
  and `suboptimal.at_or_above_best_median` the fraction of the suboptimal episodes scoring at or
  above the best split's median. Only completed episodes count: every episode this generator
  writes is whole; data from the older generator, whose split budget cut the last episode, has
  that episode left out (the last one of a split whose episodes did not all end by game over).
  """
  from scaled_ql.datasets import rlds_reader
  from scaled_ql.eval import normalization

  def completed(s: dict) -> list[float]:
    r = list(s['raw_returns'])
    if 'episode_steps' not in s and r and s['terminated_episodes'] < s['episodes']:
      r = r[:-1]  # older generator: the step budget cut the last episode
    return r

  def summary(returns: list[float]) -> dict:
    if not returns:
      return dict(episodes=0, score=None, normalized=None, median=None)
    score = float(np.mean(returns))
    return dict(episodes=len(returns), score=round(score, 3),
                normalized=round(float(normalization.human_normalized(game, score)), 4),
                median=float(np.median(returns)))

  by_ckpt = {int(s['checkpoint_id']): completed(s) for s in splits.values()}
  per_split = {tfds_layout.split_name(c): summary(r) for c, r in sorted(by_ckpt.items())}
  scored = [c for c, r in by_ckpt.items() if r]
  best = max(scored, key=lambda c: np.mean(by_ckpt[c])) if scored else None
  sub = rlds_reader.selected_checkpoints(rlds_reader.parse_selection('suboptimal'),
                                         sorted(by_ckpt))
  sub_returns = [x for c in sub for x in by_ckpt[c]]
  selections = {
      'suboptimal': dict(summary(sub_returns),
                         splits=[tfds_layout.split_name(c) for c in sub]),
      'near_optimal': dict(summary([x for c in sorted(by_ckpt) for x in by_ckpt[c]]),
                           splits=[tfds_layout.split_name(c) for c in sorted(by_ckpt)]),
  }
  # Episodes played at epsilon 1 (uniform random: the non-late episodes of checkpoint 0), our own
  # random reference under the data's protocol (sticky actions, no no-op starts).
  random_returns = [r for s in splits.values() if 'episode_epsilons' in s
                    for r, e in zip(s['raw_returns'], s['episode_epsilons']) if e >= 1.0]
  if random_returns:
    selections['epsilon_1'] = dict(summary(random_returns), splits=sorted(
        tfds_layout.split_name(int(s['checkpoint_id'])) for s in splits.values()
        if 1.0 in s.get('episode_epsilons', [])))
  if best is not None:
    best_median = float(np.median(by_ckpt[best]))
    selections['best_split'] = dict(summary(by_ckpt[best]), splits=[tfds_layout.split_name(best)])
    selections['suboptimal']['at_or_above_best_median'] = (
        round(float(np.mean(np.asarray(sub_returns) >= best_median)), 4) if sub_returns else None)
  return dict(splits=per_split, selections=selections)


def selection_score(data, game: str) -> tuple[Optional[float], int]:
  """Behaviour score of the data a run trains on: the mean raw score over the completed episodes
  of the splits `data.selection` reads (`data`: a DataConfig; from generation_info.json), and
  their count. (None, 0) for data without generation info (e.g. downloaded DQN-Replay) or without
  a completed episode. Raises DatasetNotFoundError when the game's data is missing."""
  from scaled_ql.datasets import rlds_reader
  b = rlds_reader.load_builder(data.data_dir, game, data.run, data.builder)
  info = read_info(b.data_dir)
  # Data converted from Dopamine's replay files has an info file too, but no game scores: its
  # rewards are stored clipped (`dopamine_convert`).
  if info is None or info.get('generator') != GENERATOR:
    return None, 0
  per_split = behaviour(game, info['splits'])['splits']
  available = [int(name.rsplit('_', 1)[1]) for name in per_split]
  chosen = rlds_reader.selected_checkpoints(rlds_reader.parse_selection(data.selection),
                                            available)
  total, count = 0.0, 0
  for c in chosen:
    split = per_split[tfds_layout.split_name(c)]
    if split['episodes']:
      total += split['score'] * split['episodes']
      count += split['episodes']
  return (total / count if count else None), count


def _policy_note(weak: str) -> str:
  if weak == 'flawed':
    return ('per episode, a skill u from the skill schedule; epsilon_min-greedy over a per-step '
            'mixture of the heuristic (probability u) and its flawed variant (flawed_policy)')
  return ('epsilon-greedy over the heuristic, one epsilon per episode drawn from the skill '
          'schedule')


def read_info(version_dir: str) -> Optional[dict]:
  """The generation_info.json of a dataset version dir (None for data we did not generate)."""
  path = os.path.join(version_dir, tfds_layout.GENERATION_INFO_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _pct(x: Optional[float]) -> str:
  return 'n/a' if x is None else f'{100 * x:.1f}%'


def behaviour_lines(game: str, info: dict) -> list[str]:
  """`data inspect`'s behaviour block for one generated game: each selection's mean raw score
  over completed episodes and its human-normalized value."""
  sel = behaviour(game, info['splits'])['selections']
  lines = ['  behaviour (raw game score, mean over completed episodes; human-normalized):']
  for name in ('epsilon_1', 'suboptimal', 'near_optimal', 'best_split'):
    if name not in sel:
      continue
    s = sel[name]
    splits = s['splits']
    span = splits[0] if len(splits) == 1 else f'{splits[0]}..{splits[-1]}'
    score = 'n/a' if s['score'] is None else f'{s["score"]:.2f}'
    label = 'epsilon 1' if name == 'epsilon_1' else name
    line = (f'    {label:<13}{span:<28} episodes {s["episodes"]:>4}  score {score:>9}  '
            f'{_pct(s["normalized"]):>8}')
    if name == 'suboptimal' and s.get('at_or_above_best_median') is not None:
      line += f'  at/above best split median: {_pct(s["at_or_above_best_median"])}'
    lines.append(line)
  return lines


def aggregate_lines(infos: dict[str, dict]) -> list[str]:
  """IQM over games of the human-normalized behaviour score of each selection ({game: info})."""
  from scaled_ql.eval import metrics
  if len(infos) < 2:
    return []
  per_game = {g: behaviour(g, info['splits'])['selections'] for g, info in infos.items()}
  parts = []
  for name in ('suboptimal', 'near_optimal', 'best_split'):
    values = [sel[name]['normalized'] for sel in per_game.values()
              if name in sel and sel[name]['normalized'] is not None]
    if len(values) == len(per_game):
      parts.append(f'{name} {_pct(metrics.iqm(np.asarray([values])))}')
  if not parts:
    return []
  return [f'behaviour over {len(infos)} generated games, human-normalized IQM: ' +
          ', '.join(parts)]


def keyed(builder_name: str, episodes: Iterator[dict]) -> Iterator[tuple[object, dict]]:
  """(key, episode) with the registered builders' own keys (`get_episode_id`)."""
  for ep in episodes:
    c, e = int(ep['checkpoint_id']), int(ep['episode_id'])
    if builder_name == tfds_layout.ORDERED_BUILDER:
      yield int(c * 10_000_000_000 + e), ep  # checkpoint_id * 1e10 + episode_id
    else:
      yield f'{c}_{e}', ep  # atari_utils.episode_id


def handle_existing(tfds_builder, game: str, if_exists: str,
                    remedy: str = '--overwrite (if_exists="overwrite") or --skip-existing '
                    '(if_exists="skip")') -> bool:
  """True if the dataset exists and is to be kept ('skip'); removes it for 'overwrite'. For
  'error', the FileExistsError names `remedy`: the flags of the calling command that would
  proceed (`data convert-dopamine` has --overwrite only)."""
  version_dir = os.fspath(tfds_builder.data_path)
  if not os.path.exists(version_dir):
    return False
  if if_exists == 'skip':
    log.info('%s: %s exists, skipped', game, version_dir)
    return True
  if if_exists == 'error':
    raise FileExistsError(
        f'{game}: {version_dir} already exists; pass {remedy}')
  shutil.rmtree(version_dir)
  return False


def generation_settings(seed: int, steps_per_checkpoint: Optional[int],
                        episodes_per_checkpoint: Optional[int], max_episode_frames: int,
                        skill: policies.SkillSchedule) -> dict:
  """The settings a game's data depends on besides its game, run and number of checkpoints, as
  generation_info.json records them (and `kept_settings_mismatch` compares them)."""
  return {'seed': seed, 'max_episode_frames': max_episode_frames,
          'steps_per_checkpoint': steps_per_checkpoint,
          'episodes_per_checkpoint': episodes_per_checkpoint,
          'skill_schedule': dataclasses.asdict(skill)}


def kept_settings_mismatch(version_dir: str, num_checkpoints: int, settings: dict) -> list[str]:
  """What differs between the settings a kept dataset was generated with (its
  generation_info.json) and those asked for (`num_checkpoints`, `generation_settings(...)`): one
  'name: kept X, asked Y' line per difference. A setting the file does not record (an older
  generator) is not compared; a dataset without the file (not written here, e.g. DQN-Replay
  itself, or not there at all) gives []."""
  info = read_info(version_dir)
  if info is None:
    return []
  wanted = json.loads(json.dumps(settings))  # tuples -> lists, as the file holds them
  wanted['num_checkpoints'] = num_checkpoints
  kept = {k: info[k] for k in wanted if k in info}
  if 'splits' in info:
    kept['num_checkpoints'] = len(info['splits'])
  return [f'{k}: kept {kept[k]!r}, asked {wanted[k]!r}'
          for k in wanted if k in kept and kept[k] != wanted[k]]


def write_splits(tfds_builder, get_splits) -> None:
  """Has the registered builder write files and metadata for the splits `get_splits()` returns
  ({split name: iterator of (key, episode)}).

  TFDS's own chatter (an absl INFO line per split written, and two lines it prints to stdout:
  "Downloading and preparing dataset ...", "... downloaded and prepared to ...") is silenced
  unless this module's logger is at DEBUG (`scaled-ql data generate --verbose`); TFDS's warnings
  and errors always show.
  """
  import contextlib
  import io

  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  tfds_builder.split_generators_fn = get_splits
  with contextlib.ExitStack() as quiet, tempfile.TemporaryDirectory() as download_dir:
    if not log.isEnabledFor(logging.DEBUG):
      absl_logger = logging.getLogger('absl')
      quiet.callback(absl_logger.setLevel, absl_logger.level)
      absl_logger.setLevel(logging.WARNING)
      quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
    tfds_builder.download_and_prepare(download_dir=download_dir)  # nothing is downloaded


def builder_for(game: str, run: int, data_dir: str, builder_name: str):
  """The registered `rlu_atari_checkpoints_ordered` (or `rlu_atari`) builder, with our episodes
  as its splits.

  A subclass that keeps the registered name, module, version, configs, features and file layout;
  it replaces only the split generators and sets `url_infos = None` (nothing is downloaded; the
  class-level lookup would need `importlib_resources`, not in the pinned set).
  """
  import tensorflow_datasets as tfds
  base = tfds.builder_cls(builder_name)

  class GeneratedRluAtari(base, skip_registration=True):
    name = base.name
    url_infos = None
    split_generators_fn = None

    def get_splits(self):
      return self.split_generators_fn()

    def _info(self):
      # A builder whose directory has no dataset_info.json yet (ours, before it is prepared)
      # asks TFDS's GCS bucket for a pre-computed one, in a `tempfile.mkdtemp('tfds')` folder
      # that TFDS never removes: one empty folder in the temporary directory per generated
      # game. There is nothing to fetch (the info is the one written here), so it is not asked.
      info = super()._info()
      info.initialize_from_bucket = lambda: None
      return info

  GeneratedRluAtari.__module__ = base.__module__
  return GeneratedRluAtari(
      config=tfds_layout.config_name(game, run), data_dir=data_dir)


def _env_seed(seed: int, run: int, game: str, checkpoint: int) -> int:
  ss = np.random.SeedSequence([int(seed), int(run), games_lib.ALL_GAMES.index(game), checkpoint])
  return int(ss.generate_state(1)[0] % (2**31 - 1))


WORKER_MEMORY_BYTES = 1 << 30  # a generating process peaks at ~0.63 GB (TensorFlow, TFDS, ALE)


def default_workers() -> int:
  """Processes `generate` uses unless told: one per core this process may run on, and no more
  than the memory available now holds at WORKER_MEMORY_BYTES each (at least 1)."""
  cores = len(os.sched_getaffinity(0))
  return max(1, min(cores, _available_memory_bytes() // WORKER_MEMORY_BYTES))


def _available_memory_bytes() -> int:
  """Linux's MemAvailable (free memory plus the page cache it can drop)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def generate(games: Sequence[str], out_dir: str, run: int = 1, num_checkpoints: int = 10,
             steps_per_checkpoint: Optional[int] = 5_000, seed: int = 0, *,
             episodes_per_checkpoint: Optional[int] = None,
             max_episode_frames: int = MAX_EPISODE_FRAMES,
             skill: policies.SkillSchedule = policies.SkillSchedule(),
             if_exists: str = 'error', progress: bool = True,
             builder: str = tfds_layout.ORDERED_BUILDER, workers: int = 1) -> dict[str, str]:
  """Writes `rlu_atari_checkpoints_ordered/{Game}_run_{run}` for each game into `out_dir`.

  `builder='rlu_atari'` writes the unordered layout instead (one 'train' split holding every
  checkpoint's episodes, identified by their checkpoint_id), e.g. to test that reader path.

  Budget per split: `steps_per_checkpoint` agent steps, or (if given, and steps_per_checkpoint is
  None) `episodes_per_checkpoint` whole episodes. `if_exists`: 'error' | 'skip' | 'overwrite' for
  games already generated. `workers` > 1: that many processes, one game each at a time (a game's
  data depends only on its seed, so it is the same as with 1). Returns {game: dataset version
  directory}.
  """
  games = games_lib.check_games(games)
  run = tfds_layout.check_run(run)
  tfds_layout.check_builder(builder)
  if episodes_per_checkpoint is not None:
    steps_per_checkpoint = None
  if (steps_per_checkpoint is None) == (episodes_per_checkpoint is None):
    raise ValueError('give exactly one of steps_per_checkpoint / episodes_per_checkpoint')
  budget = steps_per_checkpoint if steps_per_checkpoint is not None else episodes_per_checkpoint
  if budget < 1:
    raise ValueError(f'the per-checkpoint budget must be >= 1, got {budget}')
  if not 1 <= num_checkpoints <= 50:
    raise ValueError(f'num_checkpoints must be in 1..50 (like DQN-Replay), got {num_checkpoints}')
  if if_exists not in ('error', 'skip', 'overwrite'):
    raise ValueError(f"if_exists must be 'error', 'skip' or 'overwrite', got {if_exists!r}")
  if workers < 1:
    raise ValueError(f'workers must be >= 1, got {workers}')
  if if_exists == 'skip':
    # A kept game must be the data asked for: skipping one generated with other settings (say
    # `noisy` weak episodes where `flawed` are asked) would silently train on the wrong data.
    settings = generation_settings(seed, steps_per_checkpoint, episodes_per_checkpoint,
                                   max_episode_frames, skill)
    for game in games:
      version_dir = os.fspath(builder_for(game, run, out_dir, builder).data_path)
      diff = kept_settings_mismatch(version_dir, num_checkpoints, settings)
      if diff:
        raise ValueError(
            f'{game}: {version_dir} was generated with other settings ({"; ".join(diff)}); '
            'pass --overwrite (if_exists="overwrite") or another output directory')
  import tqdm

  os.makedirs(out_dir, exist_ok=True)
  total = (steps_per_checkpoint * num_checkpoints * len(games)
           if steps_per_checkpoint is not None else None)
  bar = tqdm.tqdm(total=total, unit='step', desc='generate', disable=not progress,
                  dynamic_ncols=True)
  job = dict(out_dir=out_dir, run=run, num_checkpoints=num_checkpoints,
             steps_per_checkpoint=steps_per_checkpoint, seed=seed,
             episodes_per_checkpoint=episodes_per_checkpoint,
             max_episode_frames=max_episode_frames, skill=skill, if_exists=if_exists,
             builder=builder)
  out: dict[str, str] = {}

  def done(game: str, result: tuple[str, Optional[int], float]) -> None:
    version_dir, steps, seconds = result
    out[game] = version_dir
    if steps is not None:
      log.info('%s: %d steps in %.1fs -> %s', game, steps, seconds, version_dir)

  try:
    workers = min(workers, len(games))
    if workers == 1:
      for game in games:
        bar.set_postfix_str(game)
        done(game, generate_game(game, on_step=lambda: bar.update(1), **job))
    else:
      _generate_in_processes(games, job, workers, bar, done)
  finally:
    bar.close()
  return {game: out[game] for game in games}


def _generate_in_processes(games, job: dict, workers: int, bar, done) -> None:
  """`generate_game` of each game in a pool of `workers` spawned processes; the progress bar
  follows a step counter they share."""
  import concurrent.futures
  import multiprocessing
  context = multiprocessing.get_context('spawn')  # no fork of a process holding TF/XLA threads
  counter = context.Value('q', 0)
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                              initializer=_init_worker,
                                              initargs=(counter,)) as pool:
    futures = {pool.submit(generate_game, game, **job): game for game in games}
    bar.set_postfix_str(f'{len(games)} games, {workers} processes')
    pending = set(futures)
    while pending:
      finished, pending = concurrent.futures.wait(pending, timeout=0.5,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
      bar.update(counter.value - bar.n)
      for future in finished:
        done(futures[future], future.result())  # a worker's exception is raised here


_STEP_COUNTER = None  # in a worker process: the step counter shared with the parent


def _init_worker(counter) -> None:
  global _STEP_COUNTER
  _STEP_COUNTER = counter


def _count_step() -> None:
  with _STEP_COUNTER.get_lock():
    _STEP_COUNTER.value += 1


def generate_game(game: str, *, out_dir: str, run: int, num_checkpoints: int,
                  steps_per_checkpoint: Optional[int], seed: int,
                  episodes_per_checkpoint: Optional[int], max_episode_frames: int,
                  skill: policies.SkillSchedule, if_exists: str, builder: str,
                  on_step=None) -> tuple[str, Optional[int], float]:
  """One game of `generate` (arguments checked there). Returns (version dir, agent steps written
  or None if the game was kept, seconds)."""
  if on_step is None and _STEP_COUNTER is not None:
    on_step = _count_step
  tfds_builder = builder_for(game, run, out_dir, builder)
  version_dir = os.fspath(tfds_builder.data_path)
  if handle_existing(tfds_builder, game, if_exists):
    return version_dir, None, 0.0
  split_stats = [
      SplitStats(checkpoint_id=k, policy=policies.heuristic_name(game),
                 env_seed=_env_seed(seed, run, game, k),
                 expert_fraction=round(skill.expert_fraction(k, num_checkpoints), 4),
                 mean_skill=round(skill.mean_skill(k, num_checkpoints), 4))
      for k in range(num_checkpoints)]
  skill_start = float(np.random.default_rng(_env_seed(seed, run, game, 99)).random())

  def get_splits():
    plays = {
        tfds_layout.split_name(s.checkpoint_id): play_split(
            game, s, num_checkpoints=num_checkpoints, skill=skill, skill_start=skill_start,
            steps_per_checkpoint=steps_per_checkpoint,
            episodes_per_checkpoint=episodes_per_checkpoint,
            max_episode_frames=max_episode_frames, on_step=on_step)
        for s in split_stats}
    if builder == tfds_layout.ORDERED_BUILDER:
      return {split: keyed(builder, eps) for split, eps in plays.items()}
    return {'train': keyed(builder, itertools.chain(*plays.values()))}

  start = time.time()
  write_splits(tfds_builder, get_splits)
  seconds = time.time() - start
  steps = sum(s.steps for s in split_stats)
  info = {
      'generator': GENERATOR,
      'builder': builder,
      'game': game, 'run': run,
      'sticky_action_prob': STICKY_ACTION_PROB,
      **generation_settings(seed, steps_per_checkpoint, episodes_per_checkpoint,
                            max_episode_frames, skill),
      'policy': policies.heuristic_name(game),
      'flawed_policy': policies.flawed_name(game) if skill.weak == 'flawed' else None,
      'policy_note': (_policy_note(skill.weak) if game in policies.HEURISTICS
                      else 'no heuristic for this game: uniform random at every epsilon'),
      'episodes_note': 'every episode is whole (game over or the max_episode_frames cap); '
                       'a step budget is a minimum: the last episode is played to its end',
      'reward_note': 'steps.reward and episode_return are clipped to [-1, 1] (as DQN-Replay); '
                     'raw_returns are the unclipped game scores',
      'seconds': round(seconds, 1),
      'steps_per_second': round(steps / max(seconds, 1e-9), 1),
      'splits': {tfds_layout.split_name(s.checkpoint_id): dataclasses.asdict(s)
                 for s in split_stats},
  }
  info['behaviour'] = behaviour(game, info['splits'])
  with open(os.path.join(version_dir, tfds_layout.GENERATION_INFO_FILE), 'w') as f:
    json.dump(info, f, indent=1)
  return version_dir, steps, seconds
