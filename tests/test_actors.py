"""The fine-tuning actor without Ray (Acme's seam: select_action, observe_first/observe, update):
the real emulator, real params of the config's network, an in-process variable server and a real
Reverb table fed through `EpisodeAdder`."""
import collections
import threading
import time

import jax
import numpy as np
import pytest
import reverb

from scaled_ql import configs
from scaled_ql.agents import actors
from scaled_ql.agents import learner as learner_lib
from scaled_ql.datasets import reverb_tables as rt
from scaled_ql.datasets import transitions as tr
from scaled_ql.envs.atari import AtariEnv
from scaled_ql.launch.variable_server import LocalVariableServer

GAME = 'Breakout'


@pytest.fixture(scope='module')
def cfg():
  return configs.finetune_online(configs.get_config('cpu_tiny'), GAME, None, pretrained=None,
                                 num_steps=100, scale=0.001).replace(
                                     data=dict(min_fill_per_game=8))


@pytest.fixture(scope='module')
def params(cfg):
  return jax.device_get(learner_lib.initial_state(cfg, jax.random.PRNGKey(0), None).params)


def make_actor(cfg, params, epsilon, adder=None, version=0, seed=0):
  server = LocalVariableServer()
  publisher = server.publisher()
  publisher.publish(params, version)
  client = server.client()
  client.update_and_wait()
  env = AtariEnv(GAME, seed=seed, max_episode_frames=400)
  actor = actors.EpsilonGreedyActor(cfg, GAME, client, epsilon, env.num_actions, seed=seed,
                                    adder=adder)
  return env, actor, publisher


def test_linear_epsilon_follows_dopamines_schedule():
  cfg = configs.finetune_online(configs.get_config('cpu_tiny'), GAME, 12, pretrained=None)
  eps = actors.LinearEpsilon.from_config(cfg)
  assert eps(-1) == eps(0) == 1.0 and eps(10**7) == pytest.approx(0.01)
  assert eps(250_000 // 4) == pytest.approx(0.01)
  assert eps(250_000 // 8) == pytest.approx(0.505)


def test_actor_explores_by_the_schedule_of_the_param_version(cfg, params):
  schedule = actors.LinearEpsilon(start=1.0, end=0.0, decay_learner_steps=10)
  env, actor, publisher = make_actor(cfg, params, schedule)
  observation = env.reset().observation
  assert actor.epsilon == 1.0  # params of step 0
  actions = {actor.select_action(observation) for _ in range(200)}
  assert len(actions) == env.num_actions  # uniform over the game's set
  # Newer params (learner step 10: the end of the decay) reach the actor through update().
  publisher.publish(params, 5)
  actor.update()
  assert actor.epsilon == 0.5
  publisher.publish(params, 10)
  actor.update(wait=True)
  greedy = {actor.select_action(observation) for _ in range(50)}
  assert actor.epsilon == 0.0 and len(greedy) == 1
  want = actors.make_policy(cfg, 0.0)(params, jax.random.PRNGKey(0), observation[None],
                                      np.asarray([0], np.int32))
  assert greedy == {int(want[0])}


def test_environment_loop_writes_each_step_into_reverb_as_it_comes(cfg, params):
  server = rt.make_server(cfg)
  address = f'localhost:{server.port}'
  adder = rt.EpisodeAdder(lambda: address, cfg, GAME)
  n_step, chunk = cfg.agent.n_step, cfg.data.reverb_chunk_length
  try:
    env, actor, _ = make_actor(cfg, params, 1.0, adder=adder, seed=3)
    stop_after = [None]  # env steps after which should_stop() says yes

    def should_stop():
      return stop_after[0] is not None and loop.env_steps >= stop_after[0]

    loop = actors.EnvironmentLoop(env, actor, should_stop=should_stop)
    # The loop counts a step before the adder writes it: a status read from another thread
    # (items first, then env_steps) never shows more items than steps. At step 40 the episode
    # is not over, and its transitions but the last few (n-step windows still open, a chunk and
    # a flush's worth in flight) are already in the table: the learner need not wait for the
    # episode's end.
    observe, ahead, mid_episode = actor.observe, [], []

    def observe_and_check(action, next_timestep):
      observe(action, next_timestep)
      ahead.append(adder.items - loop.env_steps)
      if loop.env_steps == 40:
        assert not next_timestep.last()
        mid_episode.append((adder.items, rt.table_sizes(address, [GAME])[GAME]))
    actor.observe = observe_and_check
    episode_return = loop.run_episode()
    assert ahead and max(ahead) <= 0, max(ahead)
    assert mid_episode[0][0] == 40 - n_step  # the items of the windows complete at step 40
    in_flight = chunk + tr.window_length(n_step) + rt.FLUSH_EVERY_ITEMS
    assert mid_episode[0][0] - in_flight <= mid_episode[0][1] <= mid_episode[0][0], mid_episode
    assert mid_episode[0][1] > 0
    assert loop.episodes == 1 and loop.env_steps > 40 and loop.returns == [episode_return]
    size = rt.table_sizes(address, [GAME])[GAME]
    # One item per transition: every env step of the episode.
    assert adder.items == size == loop.env_steps and adder.lost_episodes == 0
    # What was written is what was played: each item's own step (window position STACK - 1)
    # holds that step's reward, so the items' rewards sum to the episode return.
    rewards = _item_rewards(address, size)
    assert episode_return > 0  # (seed 3 scores) so the sum below checks something
    assert sum(rewards.values()) == pytest.approx(episode_return)
    # An episode stopped halfway keeps the transitions whose n-step windows it completed (5
    # steps: the first 5 - n), sent when the next episode starts.
    stop_after[0] = loop.env_steps + 5
    assert loop.run_episode() is None and loop.episodes == 1
    assert adder.items == size + 5 - n_step
    stop_after[0], before = None, loop.env_steps
    loop.run_episode()
    assert loop.episodes == 2
    total = size + 5 - n_step + loop.env_steps - before
    assert rt.table_sizes(address, [GAME])[GAME] == adder.items == total
    assert adder.lost_episodes == 0
    # Closed in the middle of an episode (a node that stops while its loop makes one more step):
    # the rest of the episode is dropped and counted; no new writer takes it up without the
    # records its windows need.
    adder.add_first(env.reset())
    for _ in range(5):
      adder.add(0, env.step(0))
    adder.close()
    for _ in range(5):
      adder.add(0, env.step(0))
    assert adder.items == total + 5 - n_step and adder.lost_episodes == 1
    assert adder._writer is None  # pylint: disable=protected-access  (none opened after close)
  finally:
    adder.close()
    server.stop()


def test_an_episode_goes_on_through_a_server_killed_and_back_at_its_port(cfg):
  """The program's replay killed (SIGKILL) in the middle of an actor's episode and restarted at
  its port while the actor plays on (its writes wait in 0.5-s slices while the server is down):
  the adder's writer reconnects and sends its pending items' records again, so the episode goes
  on. What the new server gets is exactly what an adder that was never interrupted writes, less
  what the killed server held; nothing is counted lost."""
  server, restart, restarted = rt.start_server_process(cfg), None, []
  reference = rt.make_server(cfg)
  stop = threading.Event()  # as in the node: waits go in 0.5-s slices
  adder = rt.EpisodeAdder(lambda: server.address, cfg, GAME, stop=stop)
  reference_address = f'localhost:{reference.port}'
  uninterrupted = rt.EpisodeAdder(lambda: reference_address, cfg, GAME)
  env = AtariEnv(GAME, seed=0, max_episode_frames=400)  # 100 agent steps
  rng = np.random.default_rng(0)

  def play(num_steps):
    for _ in range(num_steps):
      action = int(rng.integers(env.num_actions))
      timestep = env.step(action)
      adder.add(action, timestep)
      uninterrupted.add(action, timestep)
      if timestep.last():
        return True
    return False

  try:
    timestep = env.reset()
    adder.add_first(timestep)
    uninterrupted.add_first(timestep)
    assert not play(40)
    killed = _settled_windows(server.address)  # what the server holds once the sends settle
    assert 0 < sum(killed.values()) < adder.items == 40 - cfg.agent.n_step  # some pending
    server.proc.kill()
    server.proc.wait()
    def start_again():  # (~5 s: the server process's imports)
      try:
        restarted.append(rt.start_server_process(cfg, port=server.port))
      finally:
        if not restarted:  # it failed: the stop ends the writes waiting for it, and the test
          stop.set()

    restart = threading.Thread(target=start_again)
    restart.start()
    assert play(100)  # to the episode's end, through the outage
    restart.join()
    assert adder.lost_episodes == 0 and adder.items == uninterrupted.items
    assert _settled_windows(server.address) + killed == _settled_windows(reference_address)
  finally:
    stop.set()
    adder.close()
    uninterrupted.close()
    if restart is not None:
      restart.join()  # (bounded: the server's start gives up after 60 s)
    for each in [server, *restarted]:
      each.stop()
    reference.stop()


def _settled_windows(address, quiet_s=1.0, timeout_s=30.0):
  """Counter of the items' bytes (their records) in the table, read once its size has not
  moved for `quiet_s`."""
  deadline = time.monotonic() + timeout_s
  size, since = rt.table_sizes(address, [GAME])[GAME], time.monotonic()
  while time.monotonic() - since < quiet_s:
    assert time.monotonic() < deadline, f'the table never settled ({size} items)'
    time.sleep(0.1)
    now = rt.table_sizes(address, [GAME])[GAME]
    if now != size:
      size, since = now, time.monotonic()
  return collections.Counter(np.asarray(item).tobytes() for item in _items(address, size).values())


def _item_rewards(address, size):
  """{item key: reward of the item's own step} over every item of the (uniform) table."""
  return {key: float(tr.unpack_records(np.asarray(item)).reward[tr.STACK - 1])
          for key, item in _items(address, size).items()}


def _items(address, size):
  """{item key: its one column} over every item of the (uniform) table."""
  client = reverb.Client(address)
  items = {}
  for _ in range(50):
    for sample in client.sample(rt.table_name(GAME), num_samples=4 * size,
                                emit_timesteps=False):
      items[int(sample.info.key)] = sample.data[0]
    if len(items) == size:
      return items
  raise AssertionError(f'sampled {len(items)} of {size} items')


def test_actor_needs_params_and_a_config_game(cfg, params):
  server = LocalVariableServer()
  env = AtariEnv(GAME, seed=0, max_episode_frames=100)
  actor = actors.EpsilonGreedyActor(cfg, GAME, server.client(), 0.5, env.num_actions, seed=0)
  with pytest.raises(RuntimeError, match='no params'):
    actor.select_action(env.reset().observation)
  with pytest.raises(ValueError, match='Pong'):
    actors.EpsilonGreedyActor(cfg, 'Pong', server.client(), 0.5, env.num_actions, seed=0)
