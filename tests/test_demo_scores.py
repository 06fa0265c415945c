"""The demo's learning report: the data's behaviour score per game and the resume line."""
import os

from scaled_ql.configs import get_config
from scaled_ql.datasets import generate, rlds_reader, tfds_layout
from scaled_ql.launch import demo


def test_data_score_is_the_trained_selection_behaviour(tiny_dataset_dir):
  for selection, splits in [('checkpoints:1-1', ['checkpoint_01']),
                            ('near_optimal', ['checkpoint_00', 'checkpoint_01'])]:
    cfg = get_config('cpu_tiny').replace(
        data=dict(data_dir=tiny_dataset_dir, selection=selection))
    for game in cfg.games:
      info = generate.read_info(rlds_reader.load_builder(tiny_dataset_dir, game).data_dir)
      per_split = generate.behaviour(game, info['splits'])['splits']
      count = sum(per_split[s]['episodes'] for s in splits)
      total = sum(per_split[s]['score'] * per_split[s]['episodes'] for s in splits
                  if per_split[s]['episodes'])
      score, n = generate.selection_score(cfg.data, game)
      assert n == count
      assert (score is None) if count == 0 else abs(score - total / count) < 1e-9


def test_resume_line_says_resume_or_start_over(tmp_path):
  workdir = str(tmp_path / 'demo')
  assert 'starting a new run' in demo.resume_line(workdir)
  os.makedirs(os.path.join(workdir, 'checkpoints', '1000'))
  os.makedirs(os.path.join(workdir, 'checkpoints', '2000'))
  line = demo.resume_line(workdir)
  assert 'resuming' in line and 'step 2000' in line and 'rm -r' in line


def test_method_label_names_what_was_trained():
  assert demo.method_label(get_config('cpu_small').agent) == 'Scaled QL, CQL alpha 0.05'
  assert demo.method_label(get_config('cpu_small_bc').agent) == 'BC'
  assert demo.method_label(get_config('cpu_small_no_cql').agent) == 'Scaled QL, CQL alpha 0'
  agent = get_config('cpu_small').replace(agent=dict(loss='bc', cql_alpha=0.0)).agent
  assert demo.method_label(agent) == 'BC'  # `scaled-ql demo --set agent.loss=bc`


def test_a_game_counts_against_its_data_only_with_enough_agent_episodes():
  """One long Breakout episode of 11.0 against the data's 10.83 (a fresh-clone demo) is shown but
  not counted: the demo's claim needs a mean over >= 3 completed episodes."""
  assert demo.verdict(10.83, 11.0, 1) == ('not compared: 1 agent episode(s) < 3', None)
  assert demo.verdict(22.5, 41.3, 3) == ('above the data', True)
  assert demo.verdict(-16.67, -21.0, 6) == ('not above the data', False)
  assert demo.verdict(None, 5.0, 3) == ('', None)
  assert demo.verdict(5.0, None, 0) == ('', None)


def test_demo_data_is_flawed_data_for_the_demo_games(tmp_path, monkeypatch):
  """The demo's own data (issue 11 section 4): its default games, generated with `flawed` weak
  episodes (the better action is in the minority of a state's data), in its own directory; a
  second call keeps what is there."""
  assert demo.DEMO_DATA_DIR != get_config('cpu_small').data.data_dir
  monkeypatch.setattr(demo, 'DEMO_CHECKPOINTS', 2)
  monkeypatch.setattr(demo, 'DEMO_STEPS_PER_CHECKPOINT', 30)
  game = demo.DEMO_GAMES[0]
  cfg = get_config('cpu_small').replace(games=(game,), data=dict(data_dir=str(tmp_path)))
  demo.ensure_demo_data(cfg)
  version_dir = rlds_reader.load_builder(str(tmp_path), game).data_dir
  info_path = os.path.join(version_dir, tfds_layout.GENERATION_INFO_FILE)
  info = generate.read_info(version_dir)
  assert info['skill_schedule']['weak'] == 'flawed'
  assert info['flawed_policy'] and 'never fires' in info['flawed_policy']
  assert len(info['splits']) == 2
  mtime = os.path.getmtime(info_path)
  demo.ensure_demo_data(cfg)
  assert os.path.getmtime(info_path) == mtime


def test_demo_games_have_a_flawed_script():
  from scaled_ql.datasets import policies
  assert demo.DEMO_WEAK_EPISODES in policies.WEAK_EPISODES
  assert all(game in policies.FLAWED for game in demo.DEMO_GAMES)


def test_demo_config_is_cpu_small_on_the_demo_games_with_the_users_changes():
  cfg = demo.demo_config()
  assert cfg.games == demo.DEMO_GAMES and cfg.name == demo.DEMO_CONFIG
  assert cfg.agent == get_config(demo.DEMO_CONFIG).agent  # the shipped recipe, unchanged
  assert cfg.eval.num_evaluators == 1 and cfg.data.data_dir == demo.DEMO_DATA_DIR
  cfg = demo.demo_config(games='Pong', overrides=['agent.target_update_period=100'])
  assert cfg.games == ('Pong',) and cfg.agent.target_update_period == 100
  assert any('target_update_period=100' in o for o in cfg.overrides)  # recorded in config.json


def test_the_header_says_the_final_budget_only_of_a_finished_final_evaluation():
  """The header said "a budget of <final budget>" whatever the rows were: after a final
  evaluation that timed out they are older params' rounds on the normal budget."""
  final = dict(budget=3000, param_version=500)
  assert demo.score_budget_label({'Pong': final, 'Boxing': final}, 500, 3000) == (
      'a budget of 3000 agent steps per game')
  label = demo.score_budget_label({'Pong': final, 'Boxing': dict(budget=1000, param_version=400)},
                                  500, 3000)
  assert label == ("the final evaluation did not finish: each game's latest round, of the params "
                   'its row names, budgets 1000, 3000 agent steps per game')
