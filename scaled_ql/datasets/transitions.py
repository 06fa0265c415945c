"""The ONE definition of how a DQN-Replay (RLDS) episode becomes n-step training `Transition`s.

An episode is stored as a sequence of *step records*, one per RLDS step, each holding a single
84x84 frame (never a stack), so every frame is stored once. A transition at step t is read from a
fixed-size *window* of `n + STACK` consecutive records, steps t-3 .. t+n:

    window index:  0    1    2    3    4   ...  3+n
    step:         t-3  t-2  t-1   t   t+1 ...  t+n

The record stream of an episode with steps 0..L (step L has is_last and carries only the final
observation, RLDS convention) is padded with STACK-1 = 3 empty records before step 0 (zero frames:
no stacking across episode starts, Dopamine's convention, the env pads the same way) and n-1 empty
records after step L, so that every transition t = 0..L-1 has a full window; an episode of L+1 steps
gives L + n + 3 records and L transitions. The Reverb inserter appends exactly these records and
creates an item over the last `n + STACK` records wherever `RecordStream` says so; the numpy
reference `episode_transitions` cuts the same windows in memory. Both go through
`windows_to_frame_windows` (rewards, discounts, K), so the two paths cannot disagree; the learner
stacks the frames on its device (`FrameWindows.to_transition`), the reference with numpy
(`stack_frame_windows`), and tests check the two stackings agree.

Per window: K = min(n, L - t) = number of valid records after index 3;
reward = sum_{k<K} gamma^k clip(r_{t+k}); discount = 0 if step t+K is terminal (is_terminal is only
set on the last step) else gamma^K; an episode that ends without is_terminal (truncation)
bootstraps from its last observation; next_observation = frames t+K-3 .. t+K.

Items of several transitions (`DataConfig.transitions_per_item` = P > 1): one Reverb item covers
the windows of P consecutive transitions t0 .. t0+P-1 (t0 = 0, P, 2P, ...), n + STACK + P - 1
records, so one sample delivers P transitions (a sample costs about the same CPU whatever its
length; docs/history/performance_log.md). The episode's record stream then ends with
n - 1 + P - 1 padding records, and where an episode's last item reaches past its last transition,
`windows_to_frame_windows` repeats that item's last real transition in the empty places.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional

import numpy as np

from scaled_ql.types import FrameWindows, Transition

STACK = 4  # frames per observation (DQN preprocessing)
FRAME_SHAPE = (84, 84)
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1]  # 7056: one stored grey frame


class StepRecords(NamedTuple):
  """Step records (one per RLDS step or padding). Leading dims: [..., T] (any batch dims).

  frame:    uint8   [..., T, 84, 84]  the step's single grey frame (zeros for padding)
  action:   int32   [..., T]          action taken at this step's observation
  reward:   float32 [..., T]          raw (unclipped) reward of that action
  terminal: bool    [..., T]          RLDS is_terminal (only ever on the last step)
  valid:    bool    [..., T]          False for padding records
  """
  frame: Any
  action: Any
  reward: Any
  terminal: Any
  valid: Any


def window_length(n_step: int, per_item: int = 1) -> int:
  """Records per item: STACK-1 history frames, `per_item` current steps, n future steps (a single
  transition's window when per_item = 1)."""
  if n_step < 1:
    raise ValueError(f'n_step must be >= 1, got {n_step}')
  if per_item < 1:
    raise ValueError(f'data.transitions_per_item must be >= 1, got {per_item}')
  return n_step + STACK + per_item - 1


def record_dtypes() -> StepRecords:
  return StepRecords(frame=np.uint8, action=np.int32, reward=np.float32, terminal=np.bool_,
                     valid=np.bool_)


def padding_record() -> StepRecords:
  return StepRecords(frame=np.zeros(FRAME_SHAPE, np.uint8), action=np.int32(0),
                     reward=np.float32(0.0), terminal=np.bool_(False), valid=np.bool_(False))


class MalformedEpisodeError(ValueError):
  """An episode's steps break the RLDS convention or the frame format (`RecordStream`): bad data,
  which the offline inserter skips and counts (`reverb_tables.run_inserter`)."""


def _frame(observation: np.ndarray) -> np.ndarray:
  obs = np.asarray(observation)
  if obs.shape == FRAME_SHAPE + (1,):
    obs = obs[..., 0]
  if obs.shape != FRAME_SHAPE or obs.dtype != np.uint8:
    raise MalformedEpisodeError(f'step observation must be uint8 {FRAME_SHAPE} or '
                                f'{FRAME_SHAPE + (1,)}, got {obs.dtype} {obs.shape}')
  return obs


class RecordStream:
  """One episode's records (padding included), a step at a time: `push(step)` returns the
  (record, window_ends_here) pairs the step completes and `end()` those of the padding after the
  last step. An actor's adder writes them as its environment steps (`EpisodeAdder`): a
  transition's item ends n steps after it (the writer's chunks add their own delay).
  `padded_step_records` is the same stream over a whole episode (an episode with no step raises
  before any record).

  `window_ends_here` is True when the `window_length(n_step, per_item)` most recent records (this
  one included) form an item: the windows of transitions t0 .. t0+per_item-1 for t0 = 0,
  per_item, 2 per_item, ... (one item per transition when per_item = 1). The episode's last item
  may reach past its last transition: per_item - 1 more padding records are appended at the end,
  and `windows_to_frame_windows` repeats the item's last transition in those places.
  Raises `MalformedEpisodeError` (a ValueError) on an episode that does not end with is_last,
  has steps after it, marks a non-last step terminal (not the RLDS convention), does not start
  with is_first, holds a frame that is not uint8 84x84 or a reward that is not finite, or (with
  `num_actions`, the game's action set) an action outside [0, num_actions).
  """

  def __init__(self, n_step: int, per_item: int = 1, num_actions: Optional[int] = None):
    self.width = window_length(n_step, per_item)
    self._num_actions = num_actions  # the game's action set: a data action outside it raises
    self._trailing = n_step - 1 + per_item - 1
    self._per_item = per_item
    self._emitted = 0  # records, padding included
    self.num_steps = 0
    self.last_seen = False
    self._ended = False

  def _emit(self, record: StepRecords) -> tuple[StepRecords, bool]:
    self._emitted += 1
    # The item of transitions t0 .. t0+per_item-1 ends at record t0 + per_item + n + 2; records
    # before it are history. Its first transition must exist: step t0 is not the last step.
    t0 = self._emitted - self.width
    ends = (t0 >= 0 and t0 % self._per_item == 0
            and not (self.last_seen and t0 >= self.num_steps - 1))
    return record, ends

  def push(self, step: Mapping[str, Any]) -> list[tuple[StepRecords, bool]]:
    """The records of RLDS step `step` (a dict with 'observation' uint8 [84,84(,1)], 'action',
    'reward', 'is_last', 'is_terminal' and optionally 'is_first'); the first step's come after
    the STACK - 1 padding records before the episode."""
    if self.last_seen:
      raise MalformedEpisodeError('episode has steps after its is_last step')
    is_last = bool(step['is_last'])
    is_terminal = bool(step['is_terminal'])
    if is_terminal and not is_last:
      raise MalformedEpisodeError(f'step {self.num_steps} is terminal but not last (RLDS marks '
                                  'only the last)')
    if self.num_steps == 0 and 'is_first' in step and not bool(step['is_first']):
      raise MalformedEpisodeError('episode does not start with an is_first step')
    action, reward = int(step['action']), np.float32(step['reward'])
    # (The learner's one-hot `select` would read an action past the game's set as Q = 0, and a
    # NaN reward would reach every parameter: neither may pass silently.)
    if self._num_actions is not None and not 0 <= action < self._num_actions:
      raise MalformedEpisodeError(f'step {self.num_steps} has action {action}, outside the '
                                  f"game's {self._num_actions} actions")
    if not math.isfinite(reward):
      raise MalformedEpisodeError(f'step {self.num_steps} has reward {reward}')
    record = StepRecords(frame=_frame(step['observation']), action=np.int32(action),
                         reward=reward, terminal=np.bool_(is_terminal), valid=np.bool_(True))
    out = []
    if self._emitted == 0:
      out = [(padding_record(), False) for _ in range(STACK - 1)]
      self._emitted = STACK - 1
    self.num_steps += 1
    self.last_seen = is_last
    # Step s ends the window of transition s - n; that exists iff s - n >= 0 (s <= L always).
    out.append(self._emit(record))
    return out

  def end(self) -> list[tuple[StepRecords, bool]]:
    """The padding records after the episode's last step (which must have been pushed); once."""
    if not self.last_seen:
      raise MalformedEpisodeError(
          f'episode ended after {self.num_steps} steps without an is_last step')
    if self._ended:
      raise ValueError('the episode has ended already')
    self._ended = True
    return [self._emit(padding_record()) for _ in range(self._trailing)]


def padded_step_records(steps: Iterable[Mapping[str, Any]], n_step: int, per_item: int = 1,
                        num_actions: Optional[int] = None
                        ) -> Iterator[tuple[StepRecords, bool]]:
  """Streams one whole episode's records (padding included) as (record, window_ends_here) pairs:
  `RecordStream` over the RLDS steps `steps` (its docstring says which records end an item)."""
  stream = RecordStream(n_step, per_item, num_actions)
  for step in steps:
    yield from stream.push(step)
  yield from stream.end()


# Reverb stores each record as ONE uint8 column of RECORD_BYTES: the frame, then action (int32),
# reward (float32), terminal and valid (1 byte each), little-endian. One column instead of five
# makes a sample ~25-45% cheaper to unpack (fewer chunks, tensors and copies per sample;
# docs/history/performance_log.md).
_META = np.dtype([('action', '<i4'), ('reward', '<f4'), ('terminal', 'u1'), ('valid', 'u1')])
RECORD_BYTES = FRAME_BYTES + _META.itemsize  # 7066


def pack_record(record: StepRecords) -> np.ndarray:
  """One record -> uint8 [RECORD_BYTES] (the Reverb column)."""
  meta = np.array((record.action, record.reward, record.terminal, record.valid), _META)
  return np.concatenate([np.asarray(record.frame, np.uint8).reshape(-1),
                         np.frombuffer(meta.tobytes(), np.uint8)])


def unpack_records(packed: np.ndarray) -> StepRecords:
  """uint8 [..., RECORD_BYTES] -> `StepRecords` [...]; the frames are a view (no copy)."""
  packed = np.asarray(packed)
  if packed.dtype != np.uint8 or packed.shape[-1:] != (RECORD_BYTES,):
    raise ValueError(f'packed records must be uint8 [..., {RECORD_BYTES}], got {packed.dtype} '
                     f'{packed.shape}')
  lead = packed.shape[:-1]
  meta = np.ascontiguousarray(packed[..., FRAME_BYTES:]).view(_META).reshape(lead)
  return StepRecords(frame=packed[..., :FRAME_BYTES].reshape(lead + FRAME_SHAPE),
                     action=meta['action'].astype(np.int32),
                     reward=meta['reward'].astype(np.float32),
                     terminal=meta['terminal'].astype(bool), valid=meta['valid'].astype(bool))


def stack_records(records: Iterable[StepRecords]) -> StepRecords:
  records = list(records)
  dtypes = record_dtypes()
  return StepRecords(*(np.stack([getattr(r, f) for r in records]).astype(getattr(dtypes, f))
                       for f in StepRecords._fields))


def _stack_frames(planes: list) -> np.ndarray:
  """STACK uint8 planes [B, 84, 84] -> channel-last stack [B, 84, 84, STACK].

  Assigning each plane into its channel slot is ~3.5x faster than
  `np.ascontiguousarray(x.transpose(0, 2, 3, 1))` (benchmarks/data_pipeline.py notes).
  """
  out = np.empty(planes[0].shape + (len(planes),), np.uint8)
  for c, plane in enumerate(planes):
    out[..., c] = plane
  return out


def windows_to_frame_windows(windows: StepRecords, game_id: Any, *, discount: float,
                             reward_clip: float, per_item: int = 1) -> FrameWindows:
  """Batch of items [M, n+STACK+per_item-1, ...] -> `FrameWindows` of B = M x per_item
  transitions (see module doc; one window per item when per_item = 1).

  Transition b = i * per_item + j of item i has the window of records j .. j+n+STACK-1. Where j
  lies past the episode's last transition (the episode's last item), it repeats the item's last
  transition instead. Vectorised over the batch; the frames are passed through untouched (no
  copy): the learner stacks them on its device (`FrameWindows.to_transition`), the numpy
  reference with `stack_frame_windows`. `game_id`: one per item, or a scalar.
  """
  frame = np.asarray(windows.frame)
  if frame.ndim != 4 or frame.shape[2:] != FRAME_SHAPE or frame.dtype != np.uint8:
    raise ValueError(f'window frames must be uint8 [M, W, 84, 84], got {frame.dtype} '
                     f'{frame.shape}')
  items, width = frame.shape[:2]
  n = width - STACK - per_item + 1
  if per_item < 1 or n < 1:
    raise ValueError(f'item length {width} with transitions_per_item={per_item}: no room for an '
                     f'n-step target')
  for name in ('action', 'reward', 'terminal', 'valid'):
    shape = np.shape(getattr(windows, name))
    if shape != (items, width):
      raise ValueError(f'window {name} must have shape {(items, width)}, got {shape}')
  valid = np.asarray(windows.valid, bool)
  if not valid[:, STACK - 1].all():
    raise ValueError('window whose current step (index 3) is padding: not a transition')
  game_id = np.broadcast_to(np.asarray(game_id, np.int32), (items,))
  j = np.arange(per_item)
  # K_j = min(n, steps left) of sub-window j; a transition exists where K_j >= 1 (a prefix of j).
  after = np.cumsum(valid[:, STACK:], axis=1)  # [M, n + per_item - 1]
  upto = np.concatenate([np.zeros((items, 1), after.dtype), after], axis=1)
  steps_left = upto[:, j + n] - upto[:, j]  # [M, per_item]
  last = (steps_left >= 1).sum(axis=1) - 1  # every item has >= 1 transition (checked above)
  start = np.minimum(j[None], last[:, None])  # [M, per_item]
  rows = np.arange(items)[:, None]
  steps_left = steps_left[rows, start]
  k = np.arange(n)
  reward_idx = start[..., None] + STACK - 1 + k  # [M, per_item, n]
  clipped = np.clip(np.asarray(windows.reward, np.float32)[rows[..., None], reward_idx],
                    -reward_clip, reward_clip)
  powers = np.float32(discount) ** k.astype(np.float32)
  reward = np.where(k < steps_left[..., None], powers * clipped, 0.0).sum(-1)
  terminated = np.asarray(windows.terminal, bool)[rows, start + STACK - 1 + steps_left]
  bootstrap = np.where(terminated, 0.0, np.float32(discount) ** steps_left.astype(np.float32))
  flat = lambda x, dtype: np.asarray(x, dtype).reshape(items * per_item)
  # Padding records carry zero frames (`padding_record`), so the stacks need no masking.
  return FrameWindows(
      frames=frame, next_start=flat(steps_left, np.int32),
      action=flat(np.asarray(windows.action, np.int32)[rows, start + STACK - 1], np.int32),
      reward=flat(reward, np.float32), discount=flat(bootstrap, np.float32),
      game_id=flat(np.repeat(game_id, per_item), np.int32), start=flat(start, np.int32))


def stack_frame_windows(windows: FrameWindows) -> Transition:
  """`FrameWindows` -> `Transition` in numpy, on the host (the reference of `to_transition`)."""
  frame = np.asarray(windows.frames)
  start = np.asarray(windows.start)
  item = np.arange(len(start)) // (len(start) // frame.shape[0])
  first = start + np.asarray(windows.next_start)
  observation = _stack_frames([frame[item, start + c] for c in range(STACK)])
  next_observation = _stack_frames([frame[item, first + c] for c in range(STACK)])
  return Transition(observation=observation, action=windows.action, reward=windows.reward,
                    discount=windows.discount, next_observation=next_observation,
                    game_id=windows.game_id)


def windows_to_transitions(windows: StepRecords, game_id: Any, *, discount: float,
                           reward_clip: float, per_item: int = 1) -> Transition:
  """Batch of items [M, n+STACK+per_item-1, ...] -> `Transition` batch, all in numpy."""
  return stack_frame_windows(windows_to_frame_windows(windows, game_id, discount=discount,
                                                      reward_clip=reward_clip, per_item=per_item))


def episode_windows(steps: Iterable[Mapping[str, Any]], n_step: int, per_item: int = 1,
                    num_actions: Optional[int] = None) -> StepRecords:
  """All items of one episode, [I, n+STACK+per_item-1, ...] (the numpy twin of the inserter)."""
  width = window_length(n_step, per_item)
  records, ends = [], []
  for record, window_ends in padded_step_records(steps, n_step, per_item, num_actions):
    records.append(record)
    ends.append(window_ends)
  stacked = stack_records(records)
  end_idx = np.flatnonzero(ends)
  idx = end_idx[:, None] - width + 1 + np.arange(width)[None]  # [I, width]
  return StepRecords(*(a[idx] for a in stacked))


def split_steps(steps: Mapping[str, np.ndarray]) -> Iterator[dict[str, Any]]:
  """A dict of per-step arrays [T, ...] (e.g. a batched RLDS `steps`) -> per-step dicts."""
  keys = ('observation', 'action', 'reward', 'is_last', 'is_terminal')
  missing = [k for k in keys if k not in steps]
  if missing:
    raise ValueError(f'steps dict lacks {missing}; has {sorted(steps)}')
  length = len(steps['action'])
  for key in keys + (('is_first',) if 'is_first' in steps else ()):
    if len(steps[key]) != length:
      raise ValueError(f'steps[{key!r}] has {len(steps[key])} entries, action has {length}')
  use = keys + (('is_first',) if 'is_first' in steps else ())
  for i in range(length):
    yield {k: steps[k][i] for k in use}


def episode_transitions(steps: Mapping[str, np.ndarray], n: int, gamma: float, clip: float,
                        game_id: int = 0, num_actions: Optional[int] = None) -> Transition:
  """Numpy reference: every n-step transition of one episode (RLDS steps as arrays [T, ...]).

  Returns a `Transition` with leading dim T-1 (one per step but the last). `num_actions` (the
  game's action set) makes an action outside it malformed, as the inserter does.
  """
  windows = episode_windows(split_steps(steps), n, num_actions=num_actions)
  if len(windows.action) == 0:
    empty = np.zeros((0,) + FRAME_SHAPE + (STACK,), np.uint8)
    return Transition(empty, np.zeros(0, np.int32), np.zeros(0, np.float32),
                      np.zeros(0, np.float32), empty.copy(), np.zeros(0, np.int32))
  return windows_to_transitions(windows, game_id, discount=gamma, reward_clip=clip)
