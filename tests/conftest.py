"""Shared fixtures. `tiny_dataset_dir`: a real generated TFDS data dir, made once per session."""
import os
import shutil
import tempfile

import pytest

# JAX's persistent compilation cache, one per test run, shared by every process of the suite:
# pytest's own, the Ray nodes of the program tests (started by them, they inherit the
# environment) and the CLI subprocesses, so that each node start loads the update it compiled
# before instead of compiling it again. Set here, before anything imports JAX; a cache the caller
# set is kept (tests/test_checkpoint_faults.py checks a restored learner with a cached update).
# The environment's folder wins over a run's own (WORKDIR/compilation_cache,
# scaled_ql/compilation_cache.py): the tests of that one take this variable out of their
# subprocesses' environment (tests/test_compilation_cache.py, tests/test_learner.py).
_JAX_CACHE_MADE_HERE = None  # removed at the end by the process that made it
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _JAX_CACHE_MADE_HERE = tempfile.mkdtemp(prefix='scaled_ql_tests_jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _JAX_CACHE_MADE_HERE
# JAX stores what took >= 1 s to compile by default; cpu_tiny's update takes 2-3 s on this VM,
# and the tests that a restart loads it (tests/test_program.py) keep a margin on a faster one.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

TINY_GAMES = ('Breakout', 'Pong')  # the games of the `cpu_tiny` config
TINY_CHECKPOINTS = 2
TINY_STEPS_PER_CHECKPOINT = 300
TINY_MAX_EPISODE_FRAMES = 1_000  # 250 agent steps: a few (terminated or truncated) episodes


@pytest.fixture(scope='session')
def tiny_dataset_dir(tmp_path_factory) -> str:
  """TFDS data dir with rlu_atari_checkpoints_ordered/{Breakout,Pong}_run_1, 2 splits x 300 steps.

  Written by the real generator (emulator + TFDS writer), ~3 s. Treat it as read-only: copy it
  (shutil.copytree) before corrupting or changing anything.
  """
  from scaled_ql.datasets import generate
  out = str(tmp_path_factory.mktemp('tiny_dataset'))
  generate.generate(TINY_GAMES, out, run=1, num_checkpoints=TINY_CHECKPOINTS,
                    steps_per_checkpoint=TINY_STEPS_PER_CHECKPOINT, seed=0,
                    max_episode_frames=TINY_MAX_EPISODE_FRAMES, progress=False)
  return out


@pytest.fixture(scope='session')
def many_checkpoints_dataset_dir(tmp_path_factory) -> str:
  """TFDS data dir with rlu_atari_checkpoints_ordered/Breakout_run_1: 10 splits x 200 steps of
  short episodes (<= 50 steps), for replay-mixing tests (~5 s). Read-only, like tiny_dataset_dir."""
  from scaled_ql.datasets import generate
  out = str(tmp_path_factory.mktemp('many_checkpoints_dataset'))
  generate.generate(('Breakout',), out, run=1, num_checkpoints=10, steps_per_checkpoint=200,
                    seed=0, max_episode_frames=200, progress=False)
  return out


# ------------------------------------------------------------------------------------------------
# `make test-fast` (`pytest -m fast`): the edit loop's subset. It runs in 1-3 minutes on 2 cores
# and imports every module of scaled_ql (checked at the end of a `-m fast` run); the Ray programs,
# subprocess CLIs and the learning smoke tests stay in the full suite (`make test`, CI). Entries:
# 'file.py' (every test of it), 'file.py::test' (every parametrization), 'file.py::test[id]'.
FAST = frozenset({
    # whole files: pure functions, configs, the emulator, the metrics, the new Ray-free seams
    'test_compare.py', 'test_configs.py', 'test_demo_scores.py', 'test_envs.py',
    'test_host_memory.py',
    'test_losses.py', 'test_methods.py', 'test_metrics.py', 'test_normalization.py',
    'test_paper_fidelity.py', 'test_dopamine_baseline.py', 'test_augmentation.py',
    'test_imitation_probe.py', 'test_machine.py',
    # single tests of slower files (each under ~3 s)
    'test_suite_cpu.py::test_the_kinds_of_the_suites_processes',
    'test_suite_cpu.py::test_the_suites_file_order_and_fast_subset_name_tests_that_exist',
    'test_actors.py::test_linear_epsilon_follows_dopamines_schedule',
    'test_actors.py::test_actor_explores_by_the_schedule_of_the_param_version',
    'test_actors.py::test_environment_loop_writes_each_step_into_reverb_as_it_comes',
    'test_actors.py::test_actor_needs_params_and_a_config_game',
    'test_bad_data.py::test_counts_appear_in_the_progress_line',
    'test_checkpoint_faults.py::test_temporary_folders_of_interrupted_saves_are_removed',
    'test_download.py::test_bad_input_is_named_before_any_copy',
    'test_download.py::test_bad_partial_and_corrupt_destination_are_copied_again',
    'test_download.py::test_corrupt_source_shard_fails_naming_the_file',
    'test_download.py::test_dry_run_prints_sizes_and_copies_nothing',
    'test_download.py::test_interrupted_copy_resumes_where_it_stopped',
    'test_download.py::test_progress_shows_bytes_rate_and_eta',
    'test_evaluator.py::test_a_game_without_a_completed_episode_is_text_and_left_out_of_aggregates',
    'test_evaluator.py::test_bad_logs_are_named',
    'test_evaluator.py::test_new_episodes_start_only_while_the_budget_lasts_and_frame_cap_episodes_count',
    'test_evaluator.py::test_records_without_a_completed_episode_are_text_and_left_out',
    'test_evaluator.py::test_seeding_batching_and_the_policy_device',
    'test_evaluator.py::test_torn_lines_anywhere_are_skipped_and_counted',
    'test_games.py::test_minimal_action_set_matches_ale[Breakout]',
    'test_games.py::test_game_sets', 'test_games.py::test_action_mask',
    'test_games.py::test_unknown_game_lists_valid_ones',
    'test_generate.py::test_cli_generate_bad_game_is_a_clear_error',
    'test_generate.py::test_cli_inspect',
    'test_generate.py::test_convert_dopamine_replay_files',
    'test_generate.py::test_game_without_heuristic_and_episode_budget',
    'test_generate.py::test_default_workers_follow_cores_and_memory',
    'test_generate.py::test_heuristics_beat_random[Breakout-400-prefix-4]',
    'test_generate.py::test_skill_schedule_is_a_mixture_rising_across_checkpoints',
    'test_local_program.py::test_learner_data_and_evaluator_nodes_run_end_to_end_in_process',
    'test_learner.py::test_bad_inputs_raise_clear_errors',
    'test_learner.py::test_checkpoint_round_trip_is_exact_and_deterministic',
    'test_learner.py::test_learn_command_rejects_bad_flags_before_starting_anything',
    'test_learner.py::test_loggers_write_jsonl_and_tensorboard',
    'test_learner.py::test_nan_loss_raises_naming_the_step_and_keeps_checkpoint',
    'test_learner.py::test_run_stops_at_the_end_of_the_data_with_a_checkpoint',
    'test_learner.py::test_a_signal_saves_at_step_boundary_then_stops',
    'test_learner.py::test_load_mc_probe_reads_the_run_data',
    'test_networks.py::test_bad_inputs_raise_clear_errors', 'test_networks.py::test_describe_cli',
    'test_networks.py::test_flops', 'test_networks.py::test_heads_match_a_per_example_reference',
    'test_networks.py::test_mean_pool_switch', 'test_networks.py::test_no_feature_norm_switch',
    'test_networks.py::test_patchify_stem_equals_a_strided_valid_conv[4]',
    'test_networks.py::test_scalar_head_num_atoms_1',
    'test_networks.py::test_spatial_embedding_is_position_sensitive',
    'test_overrides.py::test_set_is_typed_by_the_dataclass_and_recorded',
    'test_overrides.py::test_bad_overrides_name_the_key_and_the_near_matches',
    'test_overrides.py::test_resolve_config_records_flags_and_overrides_in_order_and_validates',
    'test_overrides.py::test_config_json_is_read_strictly',
    'test_overrides.py::test_out_of_range_numbers_are_refused_before_anything_starts',
    'test_overrides.py::test_every_field_has_a_doc', 'test_overrides.py::test_config_show_and_list',
    'test_pacing.py::test_pacing_fields_follow_dopamine',
    'test_program.py::test_split_games_round_robin',
    'test_program.py::test_progress_line_shows_each_restarted_nodes_health',
    'test_program.py::test_restart_budget_allows_spaced_restarts_and_ends_a_crash_loop',
    'test_reverb.py::test_bad_input_errors', 'test_reverb.py::test_closed_iterator_stops',
    'test_reverb.py::test_a_server_leaves_no_checkpoint_folder_behind',
    'test_reverb.py::test_inserter_rejects_a_game_without_episodes',
    'test_reverb.py::test_inserter_cuts_a_malformed_episode_short_and_counts_it',
    'test_reverb.py::test_stratified_proportions',
    'test_reverb.py::test_throttle_no_deadlock_with_unequal_episode_lengths',
    'test_reverb.py::test_window_path_agrees_with_numpy_reference',
    'test_tfds.py::test_bad_input_errors_name_the_problem',
    'test_tfds.py::test_corrupt_shard_is_fatal_when_strict',
    'test_tfds.py::test_corrupt_shard_is_skipped_with_a_warning',
    'test_tfds.py::test_repeat_is_infinite_and_counts_epochs',
    'test_tfds.py::test_selections_pick_the_right_splits', 'test_tfds.py::test_summarize',
    'test_tfds.py::test_undecodable_episode_is_skipped_and_counted[garbage_proto]',
    'test_transfer.py::test_frozen_labels_and_config_checks',
    'test_transfer.py::test_epsilon_schedule_and_pacing',
    'test_transitions.py::test_device_stacking_equals_numpy_reference',
    'test_transitions.py::test_terminal_end_hand_built',
    'test_variable_server.py::test_split_by_size_is_a_balanced_partition',
    'test_variable_server.py::test_the_environment_ray_starts_with_is_undone_after',
    'test_variable_server.py::test_layout_split_join_roundtrip',
    'test_workdir.py::test_resume_refuses_a_change_of_what_the_run_is',
    'test_workdir.py::test_resume_policy_covers_the_issue_list',
    'test_workdir.py::test_output_paths_are_checked_before_any_work',
    'test_workdir.py::test_check_data_names_a_bad_selection_and_missing_games',
    'test_workdir.py::test_demo_refuses_a_changed_config_before_generating_data',
    'test_workdir.py::test_a_second_run_in_a_live_workdir_is_refused_naming_the_first',
    'test_workdir.py::test_a_url_as_workdir_or_output_is_refused_before_any_work',
    'test_workdir.py::test_the_workdir_lock_is_reentrant_in_a_process_and_released_at_the_end',
})


def _fast(item) -> set[str]:
  """The FAST entries that name this test."""
  file = item.path.name
  return {file, f'{file}::{item.originalname}', f'{file}::{item.name}'} & FAST


# The FAST entries of the files collected that matched no test (pytest_terminal_summary).
_UNMATCHED = pytest.StashKey[list]()


def pytest_configure(config):
  config.addinivalue_line('markers', 'fast: the `make test-fast` subset (tests/conftest.py FAST)')


def pytest_unconfigure(config):
  del config
  if _JAX_CACHE_MADE_HERE:
    shutil.rmtree(_JAX_CACHE_MADE_HERE, ignore_errors=True)


# The slowest files, slowest first: seconds of test time in a two-process run (`make test`'s
# arguments through benchmarks/suite_cpu.py at 16d6b36, 2026-12-07 evening, 674 tests in
# 1029 s): 423, 287, 219, 141, 113, 92, 89, 76, 62, 59, 58, 57, 54, 37, 29, 24, 21, 20, 17, 17;
# the files after them took under 15 s each. The first five kept that order in two runs of the
# hour before (916 and 924 s). `make test` hands whole files to its two pytest processes in
# collection order (`--dist loadfile --no-loadscope-reorder`): the longest first, so that the
# files left for the end are short ones and neither process runs a long one alone at the end
# (longest processing time first). Re-measure with `benchmarks/suite_cpu.py` (its per-file
# table) when files grow.
SLOWEST_FIRST = ('test_program.py', 'test_learner.py', 'test_transfer.py',
                 'test_learning_smoke.py', 'test_checkpoint_faults.py', 'test_baselines.py',
                 'test_local_program.py', 'test_generate.py', 'test_networks.py',
                 'test_evaluator.py', 'test_pacing.py', 'test_gpu_suite.py', 'test_reverb.py',
                 'test_tfds.py', 'test_variable_server.py', 'test_actors.py', 'test_envs.py',
                 'test_node_start_bench.py', 'test_transitions.py', 'test_losses.py')


def pytest_collection_modifyitems(config, items):
  matched = set()
  for item in items:
    entries = _fast(item)
    if entries:
      item.add_marker(pytest.mark.fast)
      matched |= entries
  files = {item.path.name for item in items}
  config.stash[_UNMATCHED] = sorted(entry for entry in FAST - matched
                                    if entry.split('::')[0] in files)
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  """After `-m fast`: the modules of scaled_ql that no test imported, and the FAST entries of
  the files collected that matched no test (both should be none). Under xdist (`-n`) this
  process collects nothing: the second line is not printed."""
  del exitstatus
  if config.getoption('markexpr', '') != 'fast' or config.getoption('collectonly'):
    return
  import pkgutil
  import sys
  import scaled_ql
  modules = [m.name for m in pkgutil.walk_packages(scaled_ql.__path__, 'scaled_ql.')]
  missing = sorted(m for m in modules if m not in sys.modules)
  terminalreporter.write_line(f'test-fast: {len(modules) - len(missing)} of {len(modules)} '
                              f'scaled_ql modules imported' +
                              (f'; not imported: {", ".join(missing)}' if missing else ''))
  # (a renamed test or parameter; only in the files collected whole: not for `file.py::test`)
  if any('::' in arg for arg in config.args):
    return
  unmatched = config.stash.get(_UNMATCHED, [])
  if unmatched:
    terminalreporter.write_line(f'test-fast: FAST names {len(unmatched)} test(s) that were not '
                                f'collected: {", ".join(unmatched)}')
