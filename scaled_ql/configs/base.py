"""Every hyperparameter of a run, as plain frozen dataclasses (Dopamine's habit: nothing buried).

A run is fully described by one `ExperimentConfig`; `scaled_ql.configs.get_config(name)` returns the
named settings of the paper (e.g. `atari40_suboptimal_resnet101`) or a CPU-sized one, and every run
writes the resolved config as JSON into its workdir. Paper references: Appendix B and Table B.1 of
Kumar et al., "Offline Q-Learning on Diverse Multi-Task Data Both Scales and Generalizes" (2023).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
  """The Q-network (Section 4, Figure 3, Appendix B.1)."""
  # Encoder family: 'resnet' (ResNet v1 with GroupNorm) or 'impala' (Espeholt et al. 2018).
  encoder: str = 'resnet'
  # ResNet: number of residual blocks per stage and block type. ResNet-34 = (3,4,6,3) 'basic';
  # ResNet-50/101/152 = (3,4,6,3)/(3,4,23,3)/(3,8,36,3) 'bottleneck' (He et al. 2016).
  resnet_stage_sizes: tuple[int, ...] = (3, 4, 23, 3)
  resnet_block: str = 'bottleneck'  # 'basic' | 'bottleneck'
  resnet_width: int = 64  # channels of the first stage; doubled at every later stage
  # 'imagenet': 7x7/2 conv + 3x3/2 max-pool (He et al.); 'strided': a cheap PxP/P patchify conv
  # (P = stem_patch) for CPU-sized configs (small-channel convs at 84x84 are slow on XLA:CPU);
  # 'nature': the Nature-DQN convs 8x8/4, 4x4/2, 3x3/1 (84 -> 7x7; docs/learning.md).
  stem: str = 'imagenet'
  stem_patch: int = 4  # kernel size = stride of the 'strided' stem (84 -> 84 // stem_patch)
  group_norm_groups: int = 4  # Appendix B.1 / the Kumar-lab reference code: 4 groups
  # IMPALA-CNN: channels of its three stages, scaled by `impala_width` (Lee et al. 2022 use 4/8/16
  # wide variants in the scaling plot, Figure 6).
  impala_channels: tuple[int, ...] = (16, 32, 32)
  impala_width: int = 1  # multiplies impala_channels (Figure 6: widths 4, 8, 16)
  # Learned spatial embedding (Section 4, Appendix A.3) instead of global mean pooling.
  spatial_embedding: bool = True
  spatial_embedding_features: int = 8  # features per spatial position of the embedding
  # Feed-forward trunk: Dense(2048) + LayerNorm, then three Dense(1024) + ReLU (Appendix B.1).
  trunk_first_dim: int = 2048
  trunk_hidden_dims: tuple[int, ...] = (1024, 1024, 1024)  # the Dense+ReLU layers (Appendix B.1)
  # Feature normalization: divide the representation by its L2 norm (Section 4, Table 2).
  feature_norm: bool = True
  # Compute dtype for convolutions and matmuls ('float32' | 'bfloat16'); params stay float32.
  compute_dtype: str = 'float32'
  # Input scaling: 'scale' = x / 255 (Dopamine, the paper's setting); 'standardize' = each frame of
  # the stack minus its own spatial mean, over its spatial std (+1 grey level), the CPU configs'
  # choice: with x / 255 the constant background dominates and a network at a CPU budget never
  # picks up the few pixels of a ball (docs/learning.md, "the input scaling").
  input_norm: str = 'scale'


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  """The loss and optimizer (Eq. 1, Appendix B.2/B.3, Table B.1)."""
  # 'c51' (Scaled QL), 'mse' (MSE TD ablation, Table 1), 'bc' (behaviour cloning baseline),
  # 'bcq' (discrete BCQ, Appendix A.2).
  loss: str = 'c51'
  cql_alpha: float = 0.05  # 0.05 for C51, 0.1 for MSE (Table B.1); 0 = no pessimism (A.4)
  num_atoms: int = 51  # C51 atoms on [v_min, v_max] (Appendix B.2)
  v_min: float = -20.0  # support [-20, 20] (Appendix B.2)
  v_max: float = 20.0  # upper end of the C51 support (Appendix B.2)
  discount: float = 0.99  # Table B.1
  n_step: int = 3  # n-step returns (Table B.1)
  reward_clip: float = 1.0  # rewards clipped to [-1, 1] for training (Table B.1)
  learning_rate: float = 2e-4  # 5e-5 scaled x4 for batch 512 (Appendix B.3)
  adam_eps: float = 3.125e-4  # Dopamine's Atari Adam epsilon (0.01 / 32)
  max_grad_norm: Optional[float] = None  # the paper clips nothing
  target_update_period: int = 2000  # gradient steps (Appendix B.3)
  # Stratified batches: `games_per_batch` game indices with replacement, then
  # `transitions_per_game` transitions from each (Appendix B.3): 128 x 4 = 512.
  games_per_batch: int = 128
  transitions_per_game: int = 4  # per sampled game index (Appendix B.3)
  bcq_tau: float = 0.3  # discrete BCQ action filter threshold (Appendix A.2)
  # Top-level network modules ('encoder', 'trunk', 'heads') whose params the optimizer leaves
  # unchanged (transfer with a frozen encoder: `('encoder',)`; scaled_ql/agents/transfer.py).
  frozen_modules: tuple[str, ...] = ()
  # Decay d of an exponential moving average of the params, updated after every step
  # (avg <- d * avg + (1 - d) * params) and used by actors, evaluators and `load_params` instead
  # of the online params (Polyak averaging; not in the paper). 0 = the online params (the paper).
  policy_params_ema: float = 0.0
  # Random shifts of the training observations by up to this many pixels, borders replicated
  # (DrQ; agents/augmentation.py). Not in the paper: 0 = off.
  random_shift: int = 0

  @property
  def batch_size(self) -> int:
    return self.games_per_batch * self.transitions_per_game


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the offline data comes from and how it is fed to the learner (Section 3)."""
  data_dir: str = 'data/generated'  # TFDS data dir: a local path or gs://rl_unplugged/tensorflow_datasets
  builder: str = 'rlu_atari_checkpoints_ordered'  # TFDS builder: RL Unplugged's DQN-Replay copy
  run: int = 1  # DQN-Replay run (1..5)
  # 'suboptimal' (checkpoints 00..09 = first 20%), 'near_optimal' (all), 'uniform:P' (P% of
  # episodes spread over all checkpoints; P=1 for fine-tuning), or 'checkpoints:A-B'.
  selection: str = 'suboptimal'
  # Which episodes 'uniform:P' keeps (the offset of its evenly spaced picks): one subset for the
  # whole run, the same in every epoch, every inserter and the MC probe. The readers' own seeds
  # only order the reading. Change it to train on another P% of the same data.
  selection_seed: int = 0
  # Reverb: one table per game, each a shuffle buffer of this many transitions.
  shuffle_buffer_per_game: int = 20_000
  min_fill_per_game: int = 1_000  # transitions a table holds before sampling starts
  num_inserters: int = 1  # inserter nodes, each streaming a share of the games into Reverb
  # Inserter throttle: once a game's table is full, an inserter waits until the learner has sampled
  # this many transitions per transition inserted since, so each is sampled ~this often before FIFO
  # eviction and inserters never take CPU from the learner re-inserting data nobody samples.
  samples_per_insert: float = 4.0
  # Reverb trajectory-writer chunk, in steps: each frame is stored once, compressed in chunks of
  # this many steps. Longer: better compression, but a sample decompresses whole chunks (8 vs 16:
  # -15% learner-process CPU per sampled transition at equal server memory;
  # docs/history/performance_log.md).
  reverb_chunk_length: int = 8
  prefetch_batches: int = 2  # batches the learner's Reverb sampler keeps in flight
  # Learner batches the sampler takes from Reverb and prepares in one go, then hands over one by
  # one: the same batches, in fewer and longer bursts of data-path work beside the learner (on
  # 2 cores a burst costs the learner more than its share when short;
  # docs/history/performance_log.md, "Several batches per fetch"). Each batch is still
  # games_per_batch uniform game draws.
  batches_per_fetch: int = 1
  # Consecutive transitions per Reverb item (one sample): 1 = i.i.d. transitions (Dopamine's
  # replay, the paper's reading). P > 1 (dividing agent.transitions_per_game): each game draw of a
  # stratified batch takes transitions_per_game / P runs of P consecutive transitions, and one
  # sample, whose CPU cost hardly depends on its length, delivers P transitions (CPU configs:
  # docs/history/performance_log.md). Table sizes stay in transitions (shuffle_buffer_per_game /
  # P items).
  transitions_per_item: int = 1
  # RLDS reader: checkpoints streamed at once, each at the same pace through its episodes, so a
  # game's shuffle buffer holds all of them (64 covers the 50 of a DQN-Replay run; rlds_reader).
  reader_cycle_length: int = 64
  # Bad data (corrupt shards, undecodable episodes, malformed episodes): warn, skip and count
  # (False; a malformed episode keeps its whole transitions before its fault) or fail (True).
  strict: bool = False


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Online ALE evaluation (Appendix B.3, Table B.1)."""
  epsilon: float = 0.001  # epsilon-greedy at evaluation (Table B.1)
  sticky_action_prob: float = 0.0  # no sticky actions at evaluation (Lee et al. 2022 protocol)
  max_episode_frames: int = 108_000  # max frames per episode (Table B.1: 108K)
  steps_per_game: int = 125_000  # agent steps averaged over (Castro et al. 2018); small on CPU
  # Budget of the last evaluation, of the final params at the end of a run (None: steps_per_game).
  # CPU configs evaluate often on a small budget (curves) and once on a larger one (the result).
  final_steps_per_game: Optional[int] = None
  num_envs: int = 4  # environments batched through the network per evaluator
  # The envs are split into this many groups: one group's emulators step while the network
  # computes another group's actions (JAX dispatches asynchronously); pays off only with a spare
  # core or an accelerator for the network. 1 = plain lockstep (BUILD_NOTES.md, eval section).
  env_groups: int = 1
  # Games played together, their environments batched in the same network calls: G games of one
  # environment each cost one call of batch G per step, not G calls of batch 1 (docs/evaluation.md,
  # "Games at once"). None: all of an evaluator's games; 1: one game after another. Records are
  # written as each such set of games ends.
  games_at_once: Optional[int] = None

  @property
  def final_budget(self) -> int:
    """Agent steps per game of the final evaluation: `final_steps_per_game`, else the normal
    `steps_per_game`."""
    return self.final_steps_per_game or self.steps_per_game
  # GPUs each evaluator node asks Ray for (`train --evaluator-gpus`; fractions share one GPU
  # between evaluators). > 0: the policy runs on that accelerator, batched over `num_envs`
  # environments per call; 0: on the CPU (docs/evaluation.md, "Evaluator fleets").
  gpus_per_evaluator: float = 0.0
  num_evaluators: int = 1  # evaluator nodes, each owning a share of the games
  # Cadence: with `eval_every_steps` set (paper configs: 62.5k, once per training iteration of
  # Table B.1), an evaluator evaluates the params of every learner step that is a multiple of it
  # (the learner publishes at those steps), so learning curves compare across machines; None: a
  # wall-clock cadence, every `eval_every_seconds` (CPU configs).
  eval_every_steps: Optional[int] = None
  eval_every_seconds: float = 60.0  # wall-clock cadence when eval_every_steps is None
  # ALE game mode of the evaluation environments (None: the ROM's default, as in DQN-Replay).
  # Online fine-tuning to a new mode (Section 5.2) evaluates in that mode, e.g. Breakout 12.
  game_mode: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The learner's budget and cadences (Appendix B.3)."""
  num_steps: int = 10_000_000  # gradient steps (Appendix B.3: 10M for ResNet-101)
  log_every_steps: int = 100  # learner metrics (stdout, learner.jsonl, TensorBoard) cadence
  checkpoint_every_steps: int = 5_000  # Orbax checkpoint cadence (a restart resumes from it)
  # Checkpoints at multiples of this step are never deleted (None: only the newest
  # `checkpointing.MAX_TO_KEEP` stay), so that a run's history can be evaluated afterwards
  # (`scaled-ql eval --checkpoint W --step S`), e.g. a `learn` run, which has no evaluator.
  # A multiple of checkpoint_every_steps.
  keep_checkpoint_every_steps: Optional[int] = None
  publish_every_steps: int = 100  # how often the learner pushes params to the variable server
  variable_server_shards: int = 1  # variable-server actors the params are split over
  # Fault tolerance (launch/program.py RestartBudget): Ray restarts a node any number of times
  # (preemptions days apart), but `crash_loop_restarts` restarts of one node within
  # `crash_loop_window_s` seconds are a crash loop: the program ends with that node's traceback.
  crash_loop_restarts: int = 3
  crash_loop_window_s: float = 600.0  # the window of crash_loop_restarts, in seconds
  # A node Ray has not placed on a worker for this many seconds, at its start or a restart (no
  # node of the cluster has the CPUs/GPUs it asks for free) ends the program, naming the node and
  # what it asks for. On a cluster the autoscaler may need minutes to add a GPU node; None waits
  # without limit. A local run's GPUs are checked before any node starts (run.check_gpus).
  placement_timeout_s: Optional[float] = 900.0
  # A learner that answers, is not done, and shows the same step for this many seconds ends the
  # program as a lost node does: it waits for what will not come (a wedged device), and the
  # run would otherwise wait for ever. Its
  # warm-up counts (a paper-size table fills in under a minute); a restore does not (the node is
  # restarting then). None: no limit.
  stall_timeout_s: Optional[float] = 1800.0
  seed: int = 0  # network init, batch sampling and data-selection offsets
  # The learner takes its next batch from the iterator, checks it and starts its copy to the
  # devices while the current step runs (after dispatching it, before fetching its metrics),
  # so that on an accelerator the host work and the copy overlap the step
  # (docs/history/performance_log.md, "Device prefetch"). The results are the same either way.
  device_prefetch: bool = True
  # On CPU devices, compile the update for XLA's thunk runtime (jaxlib 0.4.34's default) or, when
  # False, for its classic runtime: cpu_small's update ran 11-15% faster
  # (docs/history/performance_log.md, "XLA's classic CPU runtime"). The classic runtime aborts
  # the process on the dilated convolutions that strided convolutions' gradients become, so the
  # config check refuses False for a network with strided convolutions. Ignored on accelerators.
  xla_cpu_use_thunk_runtime: bool = True
  # The learner steps its train state packed into one flat buffer per dtype for each of params,
  # target params and optimizer state (`learner.pack_state`: 6 buffers instead of 1615 leaves for
  # ResNet-101, whose per-leaf host cost was ~5 ms of every GPU step). The steps are the same, and
  # checkpoints and published params are trees either way. Off by default: on CPU it made
  # cpu_small's update 5-32% slower, and on a GPU it has not been measured yet
  # (docs/history/performance_log.md, "A packed train state").
  packed_state: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Transfer (Section 5.2, Appendix B.4): the pretrained encoder and the online C51 loop.

  The rest of a fine-tuning run is the ordinary config: `games` = the new game, `agent` (batch 32,
  lr, alpha; `frozen_modules`), `data` (offline: selection 'uniform:1'; online: the replay
  capacity = shuffle_buffer_per_game and the warm-up = min_fill_per_game), `eval.game_mode`.
  Derived by `configs.finetune_offline` / `configs.finetune_online`.
  """
  # Learner workdir (or its checkpoints/) of the multi-game run whose encoder initializes this one;
  # None = from scratch (the same network, randomly initialized).
  pretrained: Optional[str] = None
  # For a pretrained run that kept a moving average of its params (`agent.policy_params_ema` > 0,
  # as cpu_small does): False = the encoder of the averaged params, the ones its evaluators
  # scored (`scaled-ql eval`'s default too); True = the encoder of its online params. The paper's
  # runs keep no average: both are the online params there.
  pretrained_online_params: bool = False
  # Online fine-tuning (Dopamine's C51 settings, Castro et al. 2018, with n-step 3).
  num_actors: int = 1  # FinetuneActorNodes collecting experience in the new game/mode
  update_period: int = 4  # environment steps (all actors together) per gradient step
  epsilon_start: float = 1.0  # Dopamine: epsilon 1 during the replay warm-up
  epsilon_end: float = 0.01  # Dopamine's epsilon_train
  epsilon_decay_steps: int = 250_000  # environment steps, after the replay warm-up
  actor_sticky_action_prob: float = 0.25  # Dopamine's training environments (sticky actions)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  name: str  # the named config this one is (scaled-ql config list), or a fine-tuning run's name
  games: tuple[str, ...]  # the games trained on, one Q-head each (Section 3: 40 games; Table 2: 6)
  network: NetworkConfig = NetworkConfig()
  agent: AgentConfig = AgentConfig()
  data: DataConfig = DataConfig()
  eval: EvalConfig = EvalConfig()
  train: TrainConfig = TrainConfig()
  finetune: FinetuneConfig = FinetuneConfig()
  # The command-line changes to the named config, in order ('agent.cql_alpha=0.1', ...): a
  # record (config.json, config_history.jsonl), not a setting; see configs/overrides.py.
  overrides: tuple[str, ...] = ()

  def replace(self, **kwargs: Any) -> 'ExperimentConfig':
    """`cfg.replace(agent=dict(cql_alpha=0.0), name=...)`: nested dicts update sub-configs."""
    updates = {}
    for key, value in kwargs.items():
      if isinstance(value, dict):
        value = dataclasses.replace(getattr(self, key), **value)
      updates[key] = value
    return dataclasses.replace(self, **updates)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'ExperimentConfig':
    def build(klass, values):
      kwargs = {}
      for f in dataclasses.fields(klass):
        if f.name not in values:
          continue
        v = values[f.name]
        if isinstance(v, list):
          v = tuple(v)
        kwargs[f.name] = v
      return klass(**kwargs)
    return cls(
        name=d['name'], games=tuple(d['games']),
        network=build(NetworkConfig, d.get('network', {})),
        agent=build(AgentConfig, d.get('agent', {})),
        data=build(DataConfig, d.get('data', {})),
        eval=build(EvalConfig, d.get('eval', {})),
        train=build(TrainConfig, d.get('train', {})),
        finetune=build(FinetuneConfig, d.get('finetune', {})),
        overrides=tuple(d.get('overrides', ())))


def _table_items(data: DataConfig, per_item: int) -> tuple[int, int]:
  # A table holds whole items (rounded down) and warms up on whole items (rounded up).
  return (data.shuffle_buffer_per_game // per_item,
          max(1, -(-data.min_fill_per_game // per_item)))


def table_items(cfg: ExperimentConfig) -> tuple[int, int]:
  """(max_size, min_size) of a game's Reverb table in items (`check_transitions_per_item`
  first): the data config's sizes are transitions."""
  return _table_items(cfg.data, check_transitions_per_item(cfg))


def check_transitions_per_item(cfg: ExperimentConfig) -> int:
  """`cfg.data.transitions_per_item` (P), checked against the batch and table sizes, and
  `cfg.data.batches_per_fetch`: ValueError naming the field at fault (the data path and
  `launch.run.validate` both call it)."""
  per_item, per_game = cfg.data.transitions_per_item, cfg.agent.transitions_per_game
  if per_item < 1:
    raise ValueError(f'data.transitions_per_item must be >= 1, got {per_item}')
  if cfg.data.batches_per_fetch < 1:
    raise ValueError(f'data.batches_per_fetch must be >= 1, got {cfg.data.batches_per_fetch}')
  if per_game % per_item:
    raise ValueError(f'data.transitions_per_item={per_item} must divide '
                     f'agent.transitions_per_game={per_game} (a game draw takes whole items)')
  if cfg.data.shuffle_buffer_per_game < per_item:
    raise ValueError(f'data.shuffle_buffer_per_game={cfg.data.shuffle_buffer_per_game} holds no '
                     f'item of data.transitions_per_item={per_item} transitions')
  fill, buffer = cfg.data.min_fill_per_game, cfg.data.shuffle_buffer_per_game
  if fill < 1:
    raise ValueError(f'data.min_fill_per_game must be >= 1, got {fill}')
  max_items, min_items = _table_items(cfg.data, per_item)
  if min_items > max_items:
    raise ValueError(
        f'data.min_fill_per_game={fill} must not exceed data.shuffle_buffer_per_game={buffer}: '
        'the learner would never sample' if per_item == 1 else
        f'data.min_fill_per_game={fill} is {min_items} items of data.transitions_per_item='
        f'{per_item} transitions, more than the {max_items} that '
        f'data.shuffle_buffer_per_game={buffer} holds: the learner would never sample')
  return per_item
