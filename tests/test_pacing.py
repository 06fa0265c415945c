"""Online fine-tuning's pacing is a property of the game's Reverb table (`TablePacing`), tested
without Ray on real Reverb servers at tiny sizes: the learner's own sampler (`stratified_batches`)
gets exactly Dopamine's `allowed_steps(inserted)` batches, a writer that is `slack_steps` ahead
waits (and gives up on `stop`), and a restarted server starts a new warm-up for both sides."""
import threading
import time

import dm_env
import numpy as np
import pytest
import reverb

from scaled_ql import configs
from scaled_ql.datasets import reverb_tables as rt

GAME = 'Breakout'


def online_cfg(warmup=16, batch=8, update_period=4, publish_every=2):
  base = configs.get_config('cpu_tiny')
  cfg = configs.finetune_online(base, GAME, None, pretrained=None, num_steps=100, scale=0.001)
  return cfg.replace(agent=dict(transitions_per_game=batch),
                     data=dict(min_fill_per_game=warmup, prefetch_batches=1),
                     train=dict(publish_every_steps=publish_every),
                     finetune=dict(update_period=update_period))


def episode(num_steps, rng):
  """RLDS steps of one episode (the last holds only the final observation)."""
  steps = [dict(observation=rng.integers(0, 255, (84, 84, 1), dtype=np.uint8),
                action=int(rng.integers(4)), reward=float(rng.normal()), is_first=i == 0,
                is_last=False, is_terminal=False) for i in range(num_steps)]
  steps.append(dict(observation=np.zeros((84, 84, 1), np.uint8), action=0, reward=0.0,
                    is_first=False, is_last=True, is_terminal=True))
  return steps


def play(adder, steps):
  """Feeds an RLDS episode to `adder` as an actor's timesteps (each frame stack's newest frame is
  the step's)."""
  def stack(step):
    return np.repeat(step['observation'], 4, axis=-1)
  adder.add_first(dm_env.restart(stack(steps[0])))
  for step, following in zip(steps, steps[1:]):
    if not following['is_last']:
      timestep = dm_env.transition(step['reward'], stack(following))
    elif following['is_terminal']:
      timestep = dm_env.termination(step['reward'], stack(following))
    else:
      timestep = dm_env.truncation(step['reward'], stack(following))
    adder.add(step['action'], timestep)


def table_counts(address):
  info = reverb.Client(address).server_info(timeout=5)[rt.table_name(GAME)].rate_limiter_info
  return int(info.insert_stats.completed), int(info.sample_stats.completed)


class BatchCounter:
  """The learner's sampler in a thread, counting the batches it gets."""

  def __init__(self, address, cfg):
    self.batches = 0
    self._iterator = rt.stratified_batches(address, (GAME,), cfg)
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    for _ in self._iterator:
      self.batches += 1

  def settled(self, quiet_s=1.5, timeout_s=30.0) -> int:
    """The count once it has not moved for `quiet_s` (the table holds the sampler back)."""
    deadline = time.monotonic() + timeout_s
    last, since = self.batches, time.monotonic()
    while time.monotonic() < deadline:
      time.sleep(0.1)
      if self.batches != last:
        last, since = self.batches, time.monotonic()
      elif time.monotonic() - since > quiet_s:
        return last
    raise AssertionError(f'the sampler never settled ({self.batches} batches)')

  def close(self):
    self._iterator.close()


def test_pacing_fields_follow_dopamine():
  cfg = configs.finetune_online(configs.get_config('cpu_tiny'), GAME, 12, pretrained=None)
  pacing = rt.TablePacing.from_config(cfg)
  assert (pacing.warmup, pacing.update_period, pacing.batch_size) == (
      cfg.data.min_fill_per_game, 4, 32)
  assert pacing.samples_per_insert == 8.0
  # Learner: no step before the warm-up, then one per update_period transitions.
  assert pacing.allowed_steps(pacing.warmup - 1) == 0
  assert pacing.allowed_steps(pacing.warmup) == 1
  assert pacing.allowed_steps(pacing.warmup + 400) == 101
  low, high = pacing.error_range()
  assert high - low >= 2 * pacing.samples_per_insert  # Reverb's no-deadlock condition
  with pytest.raises(ValueError, match='>= 1'):
    rt.TablePacing(warmup=0, update_period=4, batch_size=8, slack_steps=1)


def test_the_learners_sampler_gets_exactly_the_allowed_steps():
  cfg = online_cfg()
  pacing = rt.TablePacing.from_config(cfg)
  server = rt.make_server(cfg, pacing=pacing)
  address = f'localhost:{server.port}'
  writer = rt.make_writer(reverb.Client(address), cfg.agent.n_step, cfg.data.reverb_chunk_length)
  counter = BatchCounter(address, cfg)
  rng = np.random.default_rng(0)
  try:
    seen = []
    for length in (5, 6, 4, 3, 7, 9, 2):
      rt.write_episode(writer, rt.table_name(GAME), episode(length, rng), cfg.agent.n_step,
                       cfg.data.reverb_chunk_length)
      inserted, _ = table_counts(address)
      batches = counter.settled()
      seen.append((inserted, batches))
      assert batches == pacing.allowed_steps(inserted), seen
    assert seen[0][1] == 0 and seen[-1][1] >= 4  # warm-up first, then steps
  finally:
    counter.close()
    writer.close()
    server.stop()


def test_a_writer_ahead_of_the_learner_waits_and_stops_on_request():
  cfg = online_cfg(publish_every=1)  # slack 4 steps = 16 inserts beyond the warm-up
  pacing = rt.TablePacing.from_config(cfg)
  server = rt.make_server(cfg, pacing=pacing)
  address = f'localhost:{server.port}'
  stop = threading.Event()
  adder = rt.EpisodeAdder(lambda: address, cfg, GAME, stop=stop)
  rng = np.random.default_rng(1)
  steps = episode(60, rng)  # more than warm-up + slack
  writing = threading.Thread(target=play, args=(adder, steps), daemon=True)
  try:
    writing.start()
    time.sleep(2.0)
    assert writing.is_alive()  # held back by the table
    inserted, _ = table_counts(address)
    limit = pacing.warmup + pacing.slack_steps * pacing.update_period
    assert limit - 8 <= inserted <= limit, inserted  # items go in flushes of 8
    # The learner samples: the writer moves on by samples / samples_per_insert items.
    client = reverb.Client(address)
    list(client.sample(rt.table_name(GAME), num_samples=pacing.batch_size))
    time.sleep(1.0)
    after, _ = table_counts(address)
    assert after > inserted
    stop.set()
    writing.join(timeout=5)
    assert not writing.is_alive()
    # The rest of the episode is dropped; the items written before the stop stay counted.
    assert adder.lost_episodes == 1 and inserted <= adder.items < len(steps) - 1
  finally:
    stop.set()
    adder.close()
    server.stop()


def test_a_restarted_server_starts_a_new_warm_up_for_both_sides():
  """The reliability case: the sampler waits on a paced table whose server dies; the server comes
  back at its port, empty; after a new warm-up of inserts the same sampler gets batches again."""
  cfg = online_cfg()
  pacing = rt.TablePacing.from_config(cfg)
  server = rt.start_server_process(cfg, pacing=pacing)
  counter = None
  try:
    writer = rt.make_writer(reverb.Client(server.address), cfg.agent.n_step,
                            cfg.data.reverb_chunk_length)
    rng = np.random.default_rng(2)
    rt.write_episode(writer, rt.table_name(GAME), episode(20, rng), cfg.agent.n_step,
                     cfg.data.reverb_chunk_length)
    writer.close()
    counter = BatchCounter(server.address, cfg)
    inserted, _ = table_counts(server.address)
    before = counter.settled()
    assert before == pacing.allowed_steps(inserted) >= 1
    port = server.port
    server.stop()
    server = rt.start_server_process(cfg, port=port, pacing=pacing)
    assert table_counts(server.address) == (0, 0)
    writer = rt.make_writer(reverb.Client(server.address), cfg.agent.n_step,
                            cfg.data.reverb_chunk_length)
    rt.write_episode(writer, rt.table_name(GAME), episode(pacing.warmup - 4, rng),
                     cfg.agent.n_step, cfg.data.reverb_chunk_length)
    assert table_counts(server.address)[0] < pacing.warmup
    assert counter.settled(quiet_s=3.0) == before  # still warming up: nothing sampled
    rt.write_episode(writer, rt.table_name(GAME), episode(12, rng), cfg.agent.n_step,
                     cfg.data.reverb_chunk_length)
    writer.close()
    inserted, _ = table_counts(server.address)
    deadline = time.monotonic() + 60
    while counter.batches < before + pacing.allowed_steps(inserted) and (
        time.monotonic() < deadline):
      time.sleep(0.2)
    assert counter.settled() == before + pacing.allowed_steps(inserted)
  finally:
    if counter is not None:
      counter.close()
    server.stop()
