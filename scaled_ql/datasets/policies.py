"""Scripted behaviour policies for the local data generator (`generate.py`).

The real DQN-Replay data was logged by a DQN agent whose quality rises over training. Locally we
imitate that with an epsilon-greedy mix of a simple game-aware heuristic and uniform random
actions, one epsilon per episode drawn from a `SkillSchedule` whose mean skill rises across the
"checkpoints" (splits). The heuristics read the emulator RAM (addresses as annotated by AtariARI,
Anand et al. 2019, checked by probing) or follow a fixed action pattern, and pick actions by name
from the minimal action set:

- Pong:          move the paddle towards the ball's height.
- Breakout:      keep the paddle under the ball; FIRE when there is nothing to do, which serves
                 (FIRE is a no-op while the ball is in play, so holding with FIRE rather than
                 NOOP makes "serve after a lost life" the majority action of the idle states,
                 not a one-frame event a learned policy never copies).
- Freeway:       always press UP (a constant action).
- Boxing:        walk towards the opponent, 12 px below its RAM y, and punch when close.
- SpaceInvaders: sweep the cannon across its whole range (RAM x) while firing.
- Seaquest:      hold a depth (RAM y) mid-screen, face left and right in turn and fire; surface
                 when the oxygen (RAM) runs low.
- Qbert:         a fixed 6-jump loop that recolours cubes near the top without jumping off.
- RoadRunner:    run left, weaving up and down (picks up seeds, dodges the coyote).
- Centipede, BeamRider: sweep left and right (16 steps each way) while firing.
- Atlantis:      fire the right, left and centre cannons in turn.

Each scripted game also has a *flawed* script (`FLAWED`: the script with one consistent mistake),
which `SkillSchedule(weak='flawed')` plays in the weaker episodes instead of random actions.

Every other game has NO heuristic: its policy is uniformly random at every epsilon (so its splits
do not improve). This is recorded as `policy: 'none (uniform random)'` in the generation
metadata. Measured scores per game: docs/data_generation.md.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Optional

import numpy as np

from scaled_ql.envs.atari import AtariEnv

# Additive low-discrepancy steps mod 1 (Roberts' R1/R2 sequences): 1/golden ratio, 1/plastic number.
_GOLDEN = (5 ** 0.5 - 1) / 2  # 0.618...
_PLASTIC = 0.7548776662466927  # 1 / 1.3247...

# A heuristic maps the environment (for its RAM and action names) to an action index.
Heuristic = Callable[[AtariEnv], int]


@functools.lru_cache(maxsize=None)
def _action_names(game: str) -> tuple[str, ...]:
  """The names of the minimal action set's actions, by index (the set is fixed per game)."""
  env = AtariEnv(game, sticky_action_prob=0.0)
  return tuple(a.name for a in env.ale.getMinimalActionSet())


@functools.lru_cache(maxsize=None)
def _action_indices(game: str) -> dict[str, int]:
  """{action name: index in the minimal action set}."""
  return {name: i for i, name in enumerate(_action_names(game))}


def pong(env: AtariEnv, slack: int = 3) -> int:
  """`slack`: how far (px) the ball may be from the paddle's centre before the paddle moves."""
  ram = env.ale.getRAM()
  paddle_y, ball_y = int(ram[51]), int(ram[54])
  if ball_y == 0:  # ball not in play
    return 0  # NOOP
  centre = paddle_y + 6
  if centre > ball_y + slack:
    return 2  # RIGHT = paddle up in Pong
  if centre < ball_y - slack:
    return 3  # LEFT = paddle down
  return 0


def breakout_ball_in_play(ram: np.ndarray) -> bool:
  """False between a lost life (or the start) and the serve: RAM 101, the ball's y, is 0."""
  return int(ram[101]) != 0


def breakout(env: AtariEnv, slack: int = 3) -> int:
  """`slack`: how far (px) the ball may be from the paddle's centre before the paddle moves."""
  ram = env.ale.getRAM()
  paddle_x, ball_x = int(ram[72]), int(ram[99])
  if not breakout_ball_in_play(ram):  # serve
    return 1  # FIRE
  centre = paddle_x + 4  # calibrated: 21 points in 600 steps at epsilon 0 (random: ~2)
  if centre < ball_x - slack:
    return 2  # RIGHT
  if centre > ball_x + slack:
    return 3  # LEFT
  return 1  # hold with FIRE (a no-op in play), so the idle action also serves


def freeway(env: AtariEnv) -> int:
  del env
  return 1  # UP


def boxing(env: AtariEnv) -> int:
  """Walks to 12 px below the opponent and punches when close."""
  ram = env.ale.getRAM()
  dx = int(ram[33]) - int(ram[32])  # opponent x - player x
  # Punches land with the player 12 px below the opponent's RAM y (calibrated: +45..+50 per
  # 2-minute bout at epsilon 0, vs ~0 when aligning at the same y).
  dy = int(ram[35]) - int(ram[34]) + 12
  vertical = 'UP' if dy < -1 else ('DOWN' if dy > 1 else '')
  horizontal = 'RIGHT' if dx > 28 else ('LEFT' if dx < -28 else '')
  close = abs(dx) <= 38 and abs(dy) <= 4
  name = vertical + horizontal + ('FIRE' if close else '')
  return _action_indices(env.game)[name or 'NOOP']


class SpaceInvaders:
  """Sweeps the cannon between the ends of its range (RAM 28: x, 35..117) while firing.

  Measured (eps 0, sticky 0.25, 2 x 2500 steps): ~300 per episode vs ~190 random.
  """
  LEFT_END, RIGHT_END = 36, 116

  def __init__(self):
    self._direction = 1

  def __call__(self, env: AtariEnv) -> int:
    x = int(env.ale.getRAM()[28])
    if x >= self.RIGHT_END:
      self._direction = -1
    elif x <= self.LEFT_END:
      self._direction = 1
    return _action_indices(env.game)['RIGHTFIRE' if self._direction > 0 else 'LEFTFIRE']


class Seaquest:
  """Holds a depth (RAM 97: y, 13 = surface), turns left/right every `PERIOD` steps and fires;
  surfaces when the oxygen (RAM 102, full = 64) is below `LOW_OXYGEN`.

  Measured (eps 0): ~200 per episode vs ~80 random.
  """
  DEPTH, SURFACE, PERIOD, LOW_OXYGEN = 75, 13, 12, 16

  def __init__(self):
    self._t = 0
    self._surfacing = False

  def __call__(self, env: AtariEnv) -> int:
    ram = env.ale.getRAM()
    y, oxygen = int(ram[97]), int(ram[102])
    self._t += 1
    if oxygen < self.LOW_OXYGEN and y > self.SURFACE:
      self._surfacing = True
    elif y <= self.SURFACE:
      self._surfacing = False
    target = self.SURFACE if self._surfacing else self.DEPTH
    vertical = 'DOWN' if y < target - 3 else ('UP' if y > target + 3 else '')
    horizontal = 'RIGHT' if (self._t // self.PERIOD) % 2 == 0 else 'LEFT'
    if not vertical and self._t % self.PERIOD > 1:
      horizontal = ''  # turned: hold still and fire
    return _action_indices(env.game)[vertical + horizontal + 'FIRE']


class _Pattern:
  """A fixed cycle of actions, each held for `period` agent steps."""
  NAMES: tuple[str, ...] = ()
  PERIOD = 1

  def __init__(self):
    self._t = 0

  def __call__(self, env: AtariEnv) -> int:
    name = self.NAMES[(self._t // self.PERIOD) % len(self.NAMES)]
    self._t += 1
    return _action_indices(env.game)[name]


class Qbert(_Pattern):
  """Jumps (RIGHT = down-right, DOWN = down-left, LEFT = up-left, UP = up-right) in a loop that
  stays on the pyramid's top cubes. Measured (eps 0): ~575 per episode vs ~100 random."""
  NAMES = ('RIGHT', 'RIGHT', 'LEFT', 'DOWN', 'DOWN', 'UP')
  PERIOD = 6


class RoadRunner(_Pattern):
  """Runs left, weaving up and down. Measured (eps 0): ~2500 per episode vs ~30 random."""
  NAMES = ('LEFT', 'UPLEFT', 'LEFT', 'DOWNLEFT')
  PERIOD = 4


class _FiringSweep(_Pattern):
  """Sweeps left and right (16 steps each way) while firing."""
  NAMES = ('RIGHTFIRE', 'LEFTFIRE')
  PERIOD = 16


class Centipede(_FiringSweep):
  """The firing sweep. Measured (sticky 0.25, eps 0.05, 3 episodes): ~5100 per episode vs
  ~1700-3000 random; never firing: ~540."""


class BeamRider(_FiringSweep):
  """The firing sweep. Measured (sticky 0.25, eps 0.05, 3 episodes): ~740 per episode vs ~260-660
  random; never firing: ~130."""


class Atlantis(_Pattern):
  """Fires the right, left and centre cannons in turn, releasing the button between shots (a
  held button fires once). Measured (sticky 0.25, eps 0.05, 2 episodes): ~25000 per episode vs
  ~10000 random; never firing: ~4000; firing RIGHTFIRE / LEFTFIRE without releasing: ~2200."""
  NAMES = ('RIGHTFIRE', 'NOOP', 'LEFTFIRE', 'NOOP', 'FIRE', 'NOOP')


# game -> a heuristic function, or a class whose instances (one per environment) keep state.
HEURISTICS: dict[str, object] = {
    'Pong': pong, 'Breakout': breakout, 'Freeway': freeway, 'Boxing': boxing,
    'SpaceInvaders': SpaceInvaders, 'Seaquest': Seaquest, 'Qbert': Qbert,
    'RoadRunner': RoadRunner, 'Centipede': Centipede, 'BeamRider': BeamRider,
    'Atlantis': Atlantis,
}
NO_HEURISTIC = 'none (uniform random)'


# Flawed scripts: each game's script with one consistent mistake, as a poor DQN checkpoint's
# greedy policy has one (`SkillSchedule(weak='flawed')`). Where the game has a FIRE that scores
# (Boxing's punch; the shots of SpaceInvaders, Seaquest, Centipede, BeamRider, Atlantis), the
# mistake is to hold it back: the flawed script moves exactly as the script does, so both play in
# the same states and the data holds both actions there, the better one in the minority
# (docs/data_generation.md). Measured at
# epsilon 0.05, sticky 0.25, 1-6 episodes (script / flawed): Pong -15 / -19, Breakout 29 / 7.3,
# Freeway 20 / 11, Boxing 48 / -53, SpaceInvaders 175 / 53, Seaquest 313 / 120, Qbert 475 / 240,
# RoadRunner 2150 / 650, Centipede 2333 / 413, BeamRider 664 / 103, Atlantis 23467 / 4067.


def holds_fire(script: object) -> type:
  """A flawed-script class: `script` (a heuristic function or class) with FIRE held back. Each
  instance plays a fresh copy of the script and drops FIRE from its action (FIRE alone, or
  Atlantis' RIGHTFIRE whose set has no RIGHT: NOOP)."""
  class HoldsFire:
    def __init__(self):
      self._script = _fresh(script)

    def __call__(self, env: AtariEnv) -> int:
      indices = _action_indices(env.game)
      held = _action_names(env.game)[self._script(env)].replace('FIRE', '')
      return indices.get(held, indices['NOOP'])  # '' or a move the game lacks: NOOP

  HoldsFire.__qualname__ = f'holds_fire({getattr(script, "__qualname__", script)})'
  return HoldsFire


class QbertBackAndForth(_Pattern):
  """Jumps down-right and back up-left (does not reach new cubes)."""
  NAMES = ('RIGHT', 'LEFT')
  PERIOD = 6


class RoadRunnerStraight(_Pattern):
  """Runs left without weaving."""
  NAMES = ('LEFT',)


class FreewayHalfSpeed(_Pattern):
  """UP and NOOP in turn (a constant-action game has no state-dependent mistake to make)."""
  NAMES = ('UP', 'NOOP')


# game -> (flawed heuristic or class, what its mistake is).
FLAWED: dict[str, tuple[object, str]] = {
    'Pong': (functools.partial(pong, slack=18), 'pong with an 18-px dead zone (script: 3)'),
    'Breakout': (functools.partial(breakout, slack=16),
                 'breakout with a 16-px dead zone (script: 3)'),
    'Freeway': (FreewayHalfSpeed, FreewayHalfSpeed.__doc__),
    'Boxing': (holds_fire(boxing), 'boxing that walks where the script does and never punches'),
    'SpaceInvaders': (holds_fire(SpaceInvaders),
                      'spaceinvaders that sweeps as the script does and never fires'),
    'Seaquest': (holds_fire(Seaquest),
                 'seaquest that swims as the script does (surfacing too) and never fires'),
    'Qbert': (QbertBackAndForth, QbertBackAndForth.__doc__),
    'RoadRunner': (RoadRunnerStraight, RoadRunnerStraight.__doc__),
    **{game: (holds_fire(HEURISTICS[game]),
              f'{game.lower()} that moves as the script does and never fires')
       for game in ('Centipede', 'BeamRider', 'Atlantis')},
}


def heuristic_name(game: str) -> str:
  """What the generator's greedy policy is for `game` (recorded in the dataset metadata)."""
  fn = HEURISTICS.get(game)
  return f'{fn.__module__}.{fn.__qualname__}' if fn else NO_HEURISTIC


def flawed_name(game: str) -> str:
  """What the flawed policy of `game` is (recorded in the dataset metadata)."""
  return FLAWED[game][1] if game in FLAWED else NO_HEURISTIC


def _fresh(h) -> Optional[Heuristic]:
  return h() if isinstance(h, type) else h


def make_heuristic(game: str) -> Optional[Heuristic]:
  """A fresh heuristic for one environment of `game` (None if the game has none)."""
  return _fresh(HEURISTICS.get(game))


def make_flawed(game: str) -> Optional[Heuristic]:
  """A fresh flawed heuristic for one environment of `game` (None if the game has none)."""
  return _fresh(FLAWED[game][0]) if game in FLAWED else None


class EpsilonGreedyHeuristic:
  """With probability `epsilon` a uniform random action, else the game's heuristic, or, with
  `flawed=True`, the game's flawed heuristic with probability 1 - `script_prob`.

  Games without a heuristic act uniformly at random whatever `epsilon` is. `epsilon` and
  `script_prob` may be changed between episodes (`set_episode`): the generator draws them per
  episode. Both heuristics are called at every greedy step, so stateful ones stay in step.
  """

  def __init__(self, env: AtariEnv, epsilon: float, rng: np.random.Generator,
               flawed: bool = False):
    self._env = env
    self._rng = rng
    self._heuristic: Optional[Heuristic] = make_heuristic(env.game)
    self._flawed: Optional[Heuristic] = make_flawed(env.game) if flawed else None
    self.set_episode(epsilon)

  @property
  def epsilon(self) -> float:
    return self._epsilon

  def set_episode(self, epsilon: float, script_prob: float = 1.0) -> None:
    if not 0.0 <= epsilon <= 1.0:
      raise ValueError(f'epsilon must be in [0, 1], got {epsilon}')
    if not 0.0 <= script_prob <= 1.0:
      raise ValueError(f'script_prob must be in [0, 1], got {script_prob}')
    if script_prob < 1.0 and self._flawed is None and self._heuristic is not None:
      raise ValueError(f'script_prob {script_prob} < 1 needs flawed=True')
    self._epsilon = float(epsilon)
    self._script_prob = float(script_prob)

  def __call__(self) -> int:
    if self._heuristic is None or self._rng.random() < self._epsilon:
      return int(self._rng.integers(self._env.num_actions))
    action = int(self._heuristic(self._env))
    if self._flawed is not None:
      flawed = int(self._flawed(self._env))
      if self._rng.random() >= self._script_prob:
        return flawed
    return action


WEAK_EPISODES = ('noisy', 'flawed')  # SkillSchedule.weak


@dataclasses.dataclass(frozen=True)
class SkillSchedule:
  """Per-episode behaviour quality of the generated "checkpoints" (a mixture, as in DQN-Replay).

  The first 20% of a DQN-Replay run is not one policy of one quality: over those checkpoints the
  agent's episodes range from near-random to already good. We imitate that by drawing a *skill*
  u in [0, 1] for every episode and playing it epsilon-greedily with

      epsilon(u) = epsilon_max * (epsilon_min / epsilon_max) ** u     (u=0: 1.0, u=1: 0.05)

  over the game's heuristic. At checkpoint k of K (progress p = k / (K - 1)):
  - with probability `expert_start + (expert_end - expert_start) * p` the episode is played by
    the "late" policy (u = 1: epsilon_min), the good episodes a return-aware learner can find;
  - otherwise u ~ Uniform(0, p): from uniformly random play at checkpoint 0 to anything between
    random and expert at the last checkpoint.
  The mean skill rises with k through both terms. Defaults: the first 20% of 10 splits (the
  `suboptimal` selection) hold ~42% late-policy episodes, the last split 90%.

  `weak` says how an episode of skill u < 1 is played:
  - 'noisy' (default): epsilon(u)-greedy over the script, as above. Every non-random episode's
    most frequent action in a state is the script's, so imitation recovers the late policy;
  - 'flawed': epsilon_min-greedy over a per-step mixture that takes the script's action with
    probability u and the game's *flawed* script's (`FLAWED`: the script with one consistent
    mistake) otherwise. u = 0 is a consistent weaker policy, as a poor DQN checkpoint's greedy
    policy is (DQN-Replay logged at epsilon 0.01 after its first 1M frames). Where the flawed
    episodes are the majority of a state's data, imitation copies the mistake; a return-aware
    learner has the late-policy episodes to find the better action.
  """
  expert_start: float = 0.40
  expert_end: float = 0.90
  epsilon_max: float = 1.0
  epsilon_min: float = 0.05
  weak: str = 'noisy'

  def __post_init__(self):
    if not 0.0 <= self.expert_start <= self.expert_end <= 1.0:
      raise ValueError(f'need 0 <= expert_start <= expert_end <= 1, got '
                       f'{self.expert_start}, {self.expert_end}')
    if not 0.0 < self.epsilon_min <= self.epsilon_max <= 1.0:
      raise ValueError(f'need 0 < epsilon_min <= epsilon_max <= 1, got '
                       f'{self.epsilon_min}, {self.epsilon_max}')
    if self.weak not in WEAK_EPISODES:
      raise ValueError(f'weak must be one of {WEAK_EPISODES}, got {self.weak!r}')

  @staticmethod
  def progress(checkpoint: int, num_checkpoints: int) -> float:
    if num_checkpoints < 1 or not 0 <= checkpoint < num_checkpoints:
      raise ValueError(f'checkpoint {checkpoint} not in [0, {num_checkpoints})')
    return checkpoint / (num_checkpoints - 1) if num_checkpoints > 1 else 1.0

  def expert_fraction(self, checkpoint: int, num_checkpoints: int) -> float:
    p = self.progress(checkpoint, num_checkpoints)
    return self.expert_start + (self.expert_end - self.expert_start) * p

  def epsilon(self, skill: float) -> float:
    if self.weak == 'flawed':
      return float(self.epsilon_min)
    return float(self.epsilon_max * (self.epsilon_min / self.epsilon_max) ** float(skill))

  def script_prob(self, skill: float) -> float:
    """Probability that a greedy step takes the script's action rather than the flawed one's."""
    return float(skill) if self.weak == 'flawed' else 1.0

  def skill_at(self, v: float, checkpoint: int, num_checkpoints: int) -> float:
    """The skill at quantile `v` in [0, 1) of checkpoint k's distribution (inverse CDF): the
    late policy below `expert_fraction`, then Uniform(0, progress) spread over the rest."""
    if not 0.0 <= v < 1.0:
      raise ValueError(f'quantile must be in [0, 1), got {v}')
    q = self.expert_fraction(checkpoint, num_checkpoints)
    if v < q:
      return 1.0
    return float(self.progress(checkpoint, num_checkpoints) * (v - q) / (1.0 - q))

  def sample_skill(self, rng: np.random.Generator, checkpoint: int, num_checkpoints: int) -> float:
    return self.skill_at(float(rng.random()), checkpoint, num_checkpoints)

  def split_skills(self, start: float, checkpoint: int,
                   num_checkpoints: int) -> Iterator[float]:
    """Skills for a split's successive episodes, stratified: episode i of checkpoint k takes the
    quantile frac(start + k * 0.618 + i * 0.755) (additive low-discrepancy steps: the golden
    ratio across splits, the plastic number's within a split). So a split of a few episodes, and
    the first episodes of successive splits (the `suboptimal` selection of a small dataset),
    hold late-policy and weaker episodes in about the schedule's proportions; over many
    episodes the distribution is `sample_skill`'s. `start` in [0, 1): one per game and run."""
    v = (float(start) + checkpoint * _GOLDEN) % 1.0
    while True:
      yield self.skill_at(v, checkpoint, num_checkpoints)
      v = (v + _PLASTIC) % 1.0

  def mean_skill(self, checkpoint: int, num_checkpoints: int) -> float:
    q = self.expert_fraction(checkpoint, num_checkpoints)
    return q + (1.0 - q) * self.progress(checkpoint, num_checkpoints) / 2.0
