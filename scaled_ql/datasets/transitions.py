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
creates an item over the last `n + STACK` records wherever `padded_step_records` says so; the numpy
reference `episode_transitions` cuts the same windows in memory. Both go through
`windows_to_frame_windows` (rewards, discounts, K), so the two paths cannot disagree; the learner
stacks the frames on its device (`FrameWindows.to_transition`), the reference with numpy
(`stack_frame_windows`), and tests check the two stackings agree.

Per window: K = min(n, L - t) = number of valid records after index 3;
reward = sum_{k<K} gamma^k clip(r_{t+k}); discount = 0 if step t+K is terminal (is_terminal is only
set on the last step) else gamma^K; an episode that ends without is_terminal (truncation)
bootstraps from its last observation; next_observation = frames t+K-3 .. t+K.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, NamedTuple

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


def window_length(n_step: int) -> int:
  """Records per transition window: STACK-1 history frames, the current step, n future steps."""
  if n_step < 1:
    raise ValueError(f'n_step must be >= 1, got {n_step}')
  return n_step + STACK


def record_dtypes() -> StepRecords:
  return StepRecords(frame=np.uint8, action=np.int32, reward=np.float32, terminal=np.bool_,
                     valid=np.bool_)


def padding_record() -> StepRecords:
  return StepRecords(frame=np.zeros(FRAME_SHAPE, np.uint8), action=np.int32(0),
                     reward=np.float32(0.0), terminal=np.bool_(False), valid=np.bool_(False))


def _frame(observation: np.ndarray) -> np.ndarray:
  obs = np.asarray(observation)
  if obs.shape == FRAME_SHAPE + (1,):
    obs = obs[..., 0]
  if obs.shape != FRAME_SHAPE or obs.dtype != np.uint8:
    raise ValueError(f'step observation must be uint8 {FRAME_SHAPE} or {FRAME_SHAPE + (1,)}, '
                     f'got {obs.dtype} {obs.shape}')
  return obs


def padded_step_records(steps: Iterable[Mapping[str, Any]], n_step: int
                        ) -> Iterator[tuple[StepRecords, bool]]:
  """Streams one episode's records (padding included) as (record, window_ends_here) pairs.

  `steps` yields RLDS steps as dicts with 'observation' uint8 [84,84(,1)], 'action', 'reward',
  'is_last', 'is_terminal' (and optionally 'is_first'). `window_ends_here` is True when the
  `window_length(n_step)` most recent records (this one included) form a transition's window.
  Raises ValueError on an episode that does not end with is_last, has steps after it, or marks a
  non-last step terminal (not the RLDS convention).
  """
  width = window_length(n_step)
  emitted_records = 0

  def emit(record):
    nonlocal emitted_records
    emitted_records += 1
    # The window of transition t ends at record t + n + 3; records before it are history.
    return record, emitted_records >= width

  for _ in range(STACK - 1):
    yield padding_record(), False
    emitted_records += 1
  last_seen = False
  num_steps = 0
  for step in steps:
    if last_seen:
      raise ValueError('episode has steps after its is_last step')
    is_last = bool(step['is_last'])
    is_terminal = bool(step['is_terminal'])
    if is_terminal and not is_last:
      raise ValueError(f'step {num_steps} is terminal but not last (RLDS marks only the last)')
    if num_steps == 0 and 'is_first' in step and not bool(step['is_first']):
      raise ValueError('episode does not start with an is_first step')
    record = StepRecords(frame=_frame(step['observation']), action=np.int32(step['action']),
                         reward=np.float32(step['reward']), terminal=np.bool_(is_terminal),
                         valid=np.bool_(True))
    num_steps += 1
    last_seen = is_last
    # Step s ends the window of transition s - n; that exists iff s - n >= 0 (s <= L always).
    yield emit(record)
  if not last_seen:
    raise ValueError(f'episode ended after {num_steps} steps without an is_last step')
  for _ in range(n_step - 1):
    yield emit(padding_record())


# Reverb stores each record as ONE uint8 column of RECORD_BYTES: the frame, then action (int32),
# reward (float32), terminal and valid (1 byte each), little-endian. One column instead of five
# makes a sample ~25-45% cheaper to unpack (fewer chunks, tensors and copies per sample;
# docs/performance.md).
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
                             reward_clip: float) -> FrameWindows:
  """Batch of windows [B, n+STACK, ...] -> `FrameWindows` [B, ...] (see module doc).

  Vectorised over the batch; the frames are passed through untouched (no copy): the learner
  stacks them on its device (`FrameWindows.to_transition`), the numpy reference with
  `stack_frame_windows`.
  """
  frame = np.asarray(windows.frame)
  if frame.ndim != 4 or frame.shape[2:] != FRAME_SHAPE or frame.dtype != np.uint8:
    raise ValueError(f'window frames must be uint8 [B, W, 84, 84], got {frame.dtype} '
                     f'{frame.shape}')
  batch, width = frame.shape[:2]
  n = width - STACK
  if n < 1:
    raise ValueError(f'window length {width} < {STACK + 1}: no room for an n-step target')
  for name in ('action', 'reward', 'terminal', 'valid'):
    shape = np.shape(getattr(windows, name))
    if shape != (batch, width):
      raise ValueError(f'window {name} must have shape {(batch, width)}, got {shape}')
  valid = np.asarray(windows.valid, bool)
  if not valid[:, STACK - 1].all():
    raise ValueError('window whose current step (index 3) is padding: not a transition')
  game_id = np.broadcast_to(np.asarray(game_id, np.int32), (batch,))
  rows = np.arange(batch)

  steps_left = valid[:, STACK:].sum(axis=1)  # K = min(n, L - t)
  k = np.arange(n)
  clipped = np.clip(np.asarray(windows.reward, np.float32)[:, STACK - 1:STACK - 1 + n],
                    -reward_clip, reward_clip)
  powers = np.float32(discount) ** k.astype(np.float32)
  reward = np.where(k[None] < steps_left[:, None], powers * clipped, 0.0).sum(1)
  terminated = np.asarray(windows.terminal, bool)[rows, STACK - 1 + steps_left]
  bootstrap = np.where(terminated, 0.0, np.float32(discount) ** steps_left.astype(np.float32))
  # Padding records carry zero frames (`padding_record`), so the stacks need no masking.
  return FrameWindows(
      frames=frame, next_start=steps_left.astype(np.int32),
      action=np.asarray(windows.action, np.int32)[:, STACK - 1],
      reward=reward.astype(np.float32), discount=bootstrap.astype(np.float32),
      game_id=game_id.copy())


def stack_frame_windows(windows: FrameWindows) -> Transition:
  """`FrameWindows` -> `Transition` in numpy, on the host (the reference of `to_transition`)."""
  frame = np.asarray(windows.frames)
  rows = np.arange(frame.shape[0])
  steps_left = np.asarray(windows.next_start)
  observation = _stack_frames([frame[:, c] for c in range(STACK)])
  next_observation = _stack_frames([frame[rows, steps_left + c] for c in range(STACK)])
  return Transition(observation=observation, action=windows.action, reward=windows.reward,
                    discount=windows.discount, next_observation=next_observation,
                    game_id=windows.game_id)


def windows_to_transitions(windows: StepRecords, game_id: Any, *, discount: float,
                           reward_clip: float) -> Transition:
  """Batch of windows [B, n+STACK, ...] -> `Transition` batch [B, ...], all in numpy."""
  return stack_frame_windows(windows_to_frame_windows(windows, game_id, discount=discount,
                                                      reward_clip=reward_clip))


def episode_windows(steps: Iterable[Mapping[str, Any]], n_step: int) -> StepRecords:
  """All transition windows of one episode, [L, n+STACK, ...] (the numpy twin of the inserter)."""
  width = window_length(n_step)
  records, ends = [], []
  for record, window_ends in padded_step_records(steps, n_step):
    records.append(record)
    ends.append(window_ends)
  stacked = stack_records(records)
  end_idx = np.flatnonzero(ends)
  idx = end_idx[:, None] - width + 1 + np.arange(width)[None]  # [L, width]
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
                        game_id: int = 0) -> Transition:
  """Numpy reference: every n-step transition of one episode (RLDS steps as arrays [T, ...]).

  Returns a `Transition` with leading dim T-1 (one per step but the last).
  """
  windows = episode_windows(split_steps(steps), n)
  if len(windows.action) == 0:
    empty = np.zeros((0,) + FRAME_SHAPE + (STACK,), np.uint8)
    return Transition(empty, np.zeros(0, np.int32), np.zeros(0, np.float32),
                      np.zeros(0, np.float32), empty.copy(), np.zeros(0, np.int32))
  return windows_to_transitions(windows, game_id, discount=gamma, reward_clip=clip)
