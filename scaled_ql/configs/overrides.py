"""Configs from the command line and from files: `--set key.path=value`, `--games`, config.json.

    cfg = overrides.load('cpu_small')                       # a named config ...
    cfg = overrides.load('runs/x/config.json')              # ... or what a workdir ran
    cfg = overrides.apply(cfg, ['agent.cql_alpha=0.1', 'data.selection=uniform:5'])

Values are typed by the dataclass annotations in `base.py` (int, float, bool, str, Optional[...],
tuple[..., ...]); a key that is not a field is an error listing the near matches. Every override
applied is appended to `cfg.overrides`, so config.json (and the workdir's config history) records
how a run's config differs from the named one.

Field docs are the comments of `base.py` (above a field, or inline after it), read once with
simple-parsing's `get_attribute_docstring`; `describe(cfg)` prints them (`scaled-ql config show`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
import types
import typing
from typing import Any, Sequence

from scaled_ql.configs.base import ExperimentConfig


class ConfigError(ValueError):
  """Bad input for a run (a config name or field, a flag, the data dir or workdir), raised before
  anything expensive starts; the message names the flag/file/game at fault. Every command that
  takes a config reports it the same way (`error: ...`, exit 2)."""


_NONE_WORDS = ('none', 'null')
_TRUE_WORDS = ('true', 'yes', 'on', '1')
_FALSE_WORDS = ('false', 'no', 'off', '0')


# ------------------------------------------------------------------------------- the field tree

@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def fields() -> dict[str, tuple[type, Any]]:
  """{'agent.cql_alpha': (AgentConfig, type), ...} for every settable field, in declaration order
  (sub-config groups themselves are not settable, only their fields)."""
  out = {}
  for f in dataclasses.fields(ExperimentConfig):
    tp = _hints(ExperimentConfig)[f.name]
    if dataclasses.is_dataclass(tp):
      for g in dataclasses.fields(tp):
        out[f'{f.name}.{g.name}'] = (tp, _hints(tp)[g.name])
    else:
      out[f.name] = (ExperimentConfig, tp)
  return out


def near_matches(key: str) -> list[str]:
  """Field paths close to `key` (also when only the field's own name is given or misspelt)."""
  paths = list(fields())
  leaf = {p.rsplit('.', 1)[-1]: p for p in paths}
  found = difflib.get_close_matches(key, paths, n=3, cutoff=0.85)
  found += [leaf[m] for m in difflib.get_close_matches(key.rsplit('.', 1)[-1], list(leaf), n=3,
                                                         cutoff=0.75)]
  return list(dict.fromkeys(found))[:3]


def _unknown(key: str, where: str) -> ConfigError:
  groups = [f.name for f in dataclasses.fields(ExperimentConfig)
            if dataclasses.is_dataclass(_hints(ExperimentConfig)[f.name])]
  if key in groups:
    return ConfigError(f'{where}: {key!r} is a group of fields; set one of them, e.g. '
                       f'{", ".join(p for p in fields() if p.startswith(key + "."))}')
  near = near_matches(key)
  group = key.split('.', 1)[0]
  if near:
    hint = f'; did you mean {" or ".join(near)}?'
  elif '.' in key and group in groups:
    hint = f'; the fields of {group}: ' + ', '.join(
        p.split('.', 1)[1] for p in fields() if p.startswith(group + '.'))
  else:
    hint = ''
  return ConfigError(f'{where}: {key!r} is not a config field{hint} '
                     '(all fields: scaled-ql config show NAME)')


def type_name(tp) -> str:
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    return f'{type_name(inner[0])} or None'
  if typing.get_origin(tp) is tuple:
    return f'comma-separated {type_name(typing.get_args(tp)[0])}s'
  return getattr(tp, '__name__', str(tp))


# -------------------------------------------------------------------------------------- values

def parse_value(text: str, tp, where: str) -> Any:
  """A command-line string as a value of the annotation `tp`; ConfigError naming `where`."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    if text.strip().lower() in _NONE_WORDS:
      return None
    return parse_value(text, inner[0], where)
  if origin is tuple:
    item = typing.get_args(tp)[0]
    body = text.strip()
    if body[:1] + body[-1:] in ('()', '[]'):
      body = body[1:-1]
    return tuple(parse_value(t.strip().strip('\'"'), item, where)
                 for t in body.split(',') if t.strip())
  word = text.strip()
  try:
    if tp is bool:
      if word.lower() in _TRUE_WORDS:
        return True
      if word.lower() in _FALSE_WORDS:
        return False
      raise ValueError
    if tp is int:
      try:
        return int(word)
      except ValueError:
        value = float(word)  # 1e6, 2.5e5: fine if whole
        if not value.is_integer():
          raise
        return int(value)
    if tp is float:
      return float(word)
  except ValueError:
    raise ConfigError(f'{where}: expected {type_name(tp)}, got {text!r}') from None
  if tp is str:
    return text
  raise ConfigError(f'{where}: fields of type {tp} cannot be set from the command line')


def check_value(value: Any, tp, where: str) -> Any:
  """A JSON value (config.json) as a value of the annotation `tp` (lists -> tuples, ints for
  floats); ConfigError naming `where` for anything else."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None:
      return None
    return check_value(value, [a for a in typing.get_args(tp) if a is not type(None)][0], where)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f'{where}: expected a list of {type_name(typing.get_args(tp)[0])}, '
                        f'got {value!r}')
    return tuple(check_value(v, typing.get_args(tp)[0], where) for v in value)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp in (int, float, str, bool) and type(value) is tp:  # pylint: disable=unidiomatic-typecheck
    return value
  raise ConfigError(f'{where}: expected {type_name(tp)}, got {value!r}')


def _set(cfg: ExperimentConfig, path: str, value: Any) -> ExperimentConfig:
  if '.' in path:
    group, name = path.split('.', 1)
    return dataclasses.replace(
        cfg, **{group: dataclasses.replace(getattr(cfg, group), **{name: value})})
  return dataclasses.replace(cfg, **{path: value})


def get(cfg: ExperimentConfig, path: str) -> Any:
  value = cfg
  for part in path.split('.'):
    value = getattr(value, part)
  return value


def apply(cfg: ExperimentConfig, overrides: Sequence[str], flag: str = '--set'
          ) -> ExperimentConfig:
  """`cfg` with each 'key.path=value' applied in order, recorded in `cfg.overrides`."""
  for text in overrides:
    key, sep, raw = text.partition('=')
    key = key.strip()
    where = f'{flag} {text}' if flag == '--set' else f'{flag} {raw.strip()}'
    if not sep or not key:
      raise ConfigError(f'{flag} {text!r}: expected key.path=value, e.g. agent.cql_alpha=0.1')
    if key == 'overrides':
      raise ConfigError(f'{where}: `overrides` is the record of the others, not a setting')
    if key not in fields():
      raise _unknown(key, flag)
    value = parse_value(raw, fields()[key][1], where)
    if key == 'games':
      from scaled_ql import games as games_lib
      try:
        games_lib.check_games(value, where)
      except ValueError as e:
        raise ConfigError(str(e)) from e
    cfg = _set(cfg, key, value)
    cfg = dataclasses.replace(cfg, overrides=cfg.overrides + (f'{key}={raw.strip()}',))
  return cfg


# --------------------------------------------------------------------------------------- files

def from_json_dict(d: dict, where: str) -> ExperimentConfig:
  """An ExperimentConfig from its `to_dict()` form, every key and type checked (unlike
  `ExperimentConfig.from_dict`, which reads what it knows): a rerun runs exactly this."""
  if not isinstance(d, dict):
    raise ConfigError(f'{where}: expected a JSON object, got {type(d).__name__}')
  kwargs = {}
  for key, value in d.items():
    tp = _hints(ExperimentConfig).get(key)
    if tp is None:
      raise _unknown(key, where)
    if dataclasses.is_dataclass(tp):
      if not isinstance(value, dict):
        raise ConfigError(f'{where}: {key!r} must be an object, got {value!r}')
      sub = {}
      for name, v in value.items():
        path = f'{key}.{name}'
        if path not in fields():
          raise _unknown(path, where)
        sub[name] = check_value(v, fields()[path][1], f'{where}: {path}')
      kwargs[key] = tp(**sub)
    else:
      kwargs[key] = check_value(value, tp, f'{where}: {key}')
  missing = [f.name for f in dataclasses.fields(ExperimentConfig)
             if f.default is dataclasses.MISSING and f.name not in kwargs]
  if missing:
    raise ConfigError(f'{where}: missing {", ".join(missing)}')
  return ExperimentConfig(**kwargs)


def is_path(config: str) -> bool:
  """A --config value naming a file (config.json) or a workdir rather than a config name."""
  return (config.endswith('.json') or os.sep in config
          or os.path.isfile(os.path.join(config, 'config.json')))


CONFIG_FILE = 'config.json'  # WORKDIR/config.json: the config a run used


def write_file(cfg: ExperimentConfig, workdir: str) -> str:
  """Writes WORKDIR/config.json (what `load_file` reads back); returns its path. The one writer:
  the learner's runner and `launch.run.prepare_workdir` call it. Atomic (a temporary file, then a
  rename): a reader never sees half a file."""
  from scaled_ql import loggers
  path = os.path.join(workdir, CONFIG_FILE)
  loggers.write_atomically(path, cfg.to_json())
  return path


def load_file(path: str) -> ExperimentConfig:
  """The config of a config.json (or of a workdir holding one), exactly as that run used it."""
  if os.path.isdir(path):
    path = os.path.join(path, CONFIG_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      d = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f'--config {path!r}: no such file') from None
  except (OSError, ValueError) as e:
    raise ConfigError(f'--config {path!r}: cannot read it as JSON: {e}') from None
  return from_json_dict(d, f'--config {path}')


def load(config: str) -> ExperimentConfig:
  """A named config (`configs.get_config`) or a config.json / workdir path."""
  if is_path(config):
    return load_file(config)
  from scaled_ql import configs
  try:
    return configs.get_config(config)
  except configs.UnknownConfigError as e:
    raise ConfigError(f'--config: {e}') from e


# ---------------------------------------------------------------------------------------- docs

_REFERENCE = re.compile(r'(Section|Sec\.|Appendix|Table|Figure|Fig\.|Eq\.) ?[A-Z]?[0-9.]*[0-9]')


@functools.lru_cache(maxsize=None)
def field_doc(path: str) -> str:
  """The comment of a field in base.py (above it or inline), one line."""
  from simple_parsing.docstring import get_attribute_docstring
  if '.' in path:
    group, name = path.split('.', 1)
    cls = _hints(ExperimentConfig)[group]
  else:
    cls, name = ExperimentConfig, path
  d = get_attribute_docstring(cls, name)
  text = ' '.join(t for t in (d.comment_above, d.comment_inline, d.docstring_below) if t)
  return ' '.join(text.split())


def paper_references(text: str) -> list[str]:
  """'Appendix B.3', 'Table B.1', ... quoted in `text`."""
  return list(dict.fromkeys(m.group(0) for m in _REFERENCE.finditer(text)))


def group_doc(group: str) -> str:
  return ' '.join((_hints(ExperimentConfig)[group].__doc__ or '').split('\n\n')[0].split())


def describe(cfg: ExperimentConfig) -> str:
  """Every field of `cfg` with its value, its doc and the paper references in the doc."""
  lines = [f'config {cfg.name}' + (f'  (overrides: {" ".join(cfg.overrides)})'
                                   if cfg.overrides else '')]
  group = None
  for path in fields():
    if path == 'overrides':
      continue
    g = path.split('.', 1)[0] if '.' in path else None
    if g != group and g is not None:
      group = g
      lines.append(f'\n[{g}] {group_doc(g)}')
    value = get(cfg, path)
    doc = field_doc(path)
    refs = paper_references(doc)
    lines.append(f'  {path} = {value!r}')
    if doc:
      lines.append(f'      {doc}')
    if refs:
      lines.append(f'      paper: {", ".join(refs)}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------ command line

def add_flags(parser, *, config: bool = True, games: bool = True,
              resume: bool = True) -> None:
  """The flags of every command that takes a config (see `scaled_ql.launch.run.resolve_config`)."""
  if config:
    parser.add_argument('--config', required=True, metavar='NAME|CONFIG.json',
                        help='a named config (scaled-ql config list), or the config.json of a '
                        'workdir (or the workdir) to rerun exactly what it ran')
  parser.add_argument('--set', action='append', default=[], metavar='KEY.PATH=VALUE',
                      help='set any config field, e.g. --set agent.cql_alpha=0.1 --set '
                      'data.selection=uniform:5 (repeatable; fields and docs: scaled-ql config '
                      'show NAME); recorded in config.json')
  if games:
    parser.add_argument('--games', default=None, metavar='GAME,GAME,...',
                        help='train on these games (any of the 46; the Q-heads follow)')
  if resume:
    parser.add_argument('--allow-config-change', action='store_true',
                        help='resume a workdir even if the games, network, agent, data '
                        'selection/run or seed differ from what it ran (default: refuse)')
