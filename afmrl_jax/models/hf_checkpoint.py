"""Import / export of HF checkpoints (`config.json` + safetensors shards) for `VLModel`.

Import streams one tensor at a time: the model is built abstractly (`nnx.eval_shape`, nothing
allocated), and each parameter is created with `jax.make_array_from_callback` on its sharding, each
device's callback reading only its own slice through `safetensors.safe_open(...).get_slice`. So
the host never holds the whole model, and for tensor-sharded weights not even a whole tensor.

Names: our parameter paths mirror HF module names (`language_model.layers.3.self_attn.q_proj.kernel`
<-> `model.layers.3.self_attn.q_proj.weight`, `visual.merger.mlp_0` <-> `visual.merger.mlp.0`).
Linear kernels are stored `[in, out]` (HF `weight` transposed) and the patch embedding's Conv3d
weight `[W, C, Tp, p, p]` as a `[C*Tp*p*p, W]` matrix. Both the on-disk layout written by
transformers (`model.layers...`, `visual...`) and the in-memory one (`model.language_model...`,
`model.visual...`) are accepted on import; export writes the on-disk layout.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from safetensors import safe_open

from afmrl_jax import parallel
from afmrl_jax.models.config import VLConfig
from afmrl_jax.models.sharding import spec_for
from afmrl_jax.models.vl_model import VLModel

_RENAMES = {'mlp_0': 'mlp.0', 'mlp_2': 'mlp.2'}


def hf_name(path: tuple) -> tuple[str, str] | None:
  """Our nnx state path -> (HF tensor name, layout) or None for non-HF params (e.g. LoRA).

  layout: 'copy' (same array), 'linear' (transposed), 'patch' (Conv3d weight flattened).
  """
  parts = [str(p) for p in path]
  if any(p.startswith('lora') for p in parts):
    return None
  leaf, mods = parts[-1], [_RENAMES.get(p, p) for p in parts[:-1]]
  if parts == ['language_model', 'embed_tokens']:
    return 'model.embed_tokens.weight', 'copy'
  if mods and mods[0] == 'language_model':
    mods = ['model'] + mods[1:]
  if mods == ['visual', 'patch_embed'] and leaf == 'kernel':
    return 'visual.patch_embed.proj.weight', 'patch'
  if leaf == 'kernel':
    return '.'.join(mods + ['weight']), 'linear'
  if leaf == 'scale':
    return '.'.join(mods + ['weight']), 'copy'
  if leaf == 'bias':
    return '.'.join(mods + ['bias']), 'copy'
  return None


def _canonical(name: str) -> str:
  """transformers' in-memory names -> the on-disk names used here."""
  if name.startswith('model.language_model.'):
    return 'model.' + name[len('model.language_model.'):]
  if name.startswith('model.visual.'):
    return name[len('model.'):]
  return name


def _tensor_files(directory: str) -> dict[str, str]:
  """HF tensor name (canonical) -> shard file path."""
  index = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    return {_canonical(k): os.path.join(directory, v) for k, v in weight_map.items()}
  files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
  if not files:
    raise FileNotFoundError(f'hf_checkpoint: no *.safetensors files in {directory}')
  out = {}
  for fname in files:
    path = os.path.join(directory, fname)
    with safe_open(path, framework='flax') as f:
      out.update({_canonical(k): path for k in f.keys()})
  return out


def load_config(directory: str, **overrides) -> VLConfig:
  """`VLConfig` from `directory/config.json` (overrides e.g. dtype='bfloat16')."""
  path = os.path.join(directory, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'hf_checkpoint: {path} not found (expected an HF model directory)')
  with open(path) as f:
    return VLConfig.from_hf_dict(json.load(f), **overrides)


class _Reader:
  """Keeps shard files open and maps HF names to their actual (possibly in-memory) keys."""

  def __init__(self, directory: str):
    self.directory = directory
    self.files = _tensor_files(directory)
    self._open: dict[str, Any] = {}
    self._keys: dict[str, str] = {}

  def slice(self, name: str):
    path = self.files[name]
    if path not in self._open:
      self._open[path] = safe_open(path, framework='flax')
      self._keys.update({_canonical(k): k for k in self._open[path].keys()})
    return self._open[path].get_slice(self._keys[name])


def _reader_fn(reader: _Reader, name: str, layout: str, target_shape: tuple[int, ...], dtype,
               what: str) -> Callable[[tuple], np.ndarray]:
  """Callback for `make_array_from_callback`: one device's slice of our parameter."""
  if name not in reader.files:
    raise KeyError(f'hf_checkpoint: tensor {name!r} (for parameter {what}) is missing from '
                   f'{reader.directory}')
  src = reader.slice(name)
  shape = tuple(src.get_shape())
  expect = {'copy': target_shape, 'linear': target_shape[::-1],
            'patch': None}[layout]
  if layout == 'patch':
    ok = len(shape) == 5 and shape[0] == target_shape[1] and math.prod(shape[1:]) == target_shape[0]
    expect = (target_shape[1], '...') if not ok else shape
  else:
    ok = shape == expect
  if not ok:
    raise ValueError(f'hf_checkpoint: tensor {name!r} has shape {shape} in {reader.directory}, but '
                     f'parameter {what} needs {expect} (check config.json against the weights)')

  cpu = jax.local_devices(backend='cpu')[0]

  def read(index: tuple) -> np.ndarray:
    with jax.default_device(cpu):  # slices are staged on the host, not on an accelerator
      if layout == 'copy':
        arr = src[index]
      elif layout == 'linear':
        arr = src[tuple(reversed(index))].T
      else:
        arr = src[:].reshape(shape[0], -1).T[index]
      return np.asarray(jnp.asarray(arr).astype(dtype))

  return read


def _sharding_of(var: nnx.Variable, mesh: Mesh | None):
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  return NamedSharding(mesh, spec_for(var.get_metadata().get('out_sharding'),
                                      var.get_value().shape, mesh))


def load_hf_weights(model: VLModel, directory: str, mesh: Mesh | None = None,
                    *, strict: bool = True) -> VLModel:
  """Fills `model`'s HF-named parameters from the safetensors in `directory`, in place.

  Parameters without an HF name (LoRA adapters) keep their values. The model may be abstract
  (from `nnx.eval_shape`); then every HF-named parameter must be in the checkpoint.
  Returns the model.
  """
  reader = _Reader(directory)
  used = set()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    mapped = hf_name(path)
    if mapped is None:
      continue
    name, layout = mapped
    value = var.get_value()
    what = '.'.join(str(p) for p in path)
    if name not in reader.files and not strict:
      continue
    read = _reader_fn(reader, name, layout, tuple(value.shape), value.dtype, what)
    arr = jax.make_array_from_callback(tuple(value.shape), _sharding_of(var, mesh), read)
    var.set_value(arr)
    used.add(name)
  unused = sorted(set(reader.files) - used)
  if unused:
    logging.info('hf_checkpoint: %d tensors in %s not used: %s', len(unused), directory, unused[:8])
  return model


def load_hf_checkpoint(directory: str, mesh: Mesh | None = None, **config_overrides
                       ) -> tuple[VLModel, VLConfig]:
  """Builds a `VLModel` from an HF directory without materialising random weights.

  Args:
    directory: holds `config.json` and `model.safetensors` or sharded `*.safetensors` (+ index).
    mesh: place each parameter on its logical sharding over this mesh; None = first device.
    config_overrides: VLConfig fields, e.g. `dtype='bfloat16', param_dtype='bfloat16'`.
  Returns:
    (model, config).
  """
  config = load_config(directory, **config_overrides)
  model = nnx.eval_shape(lambda: VLModel(config, rngs=nnx.Rngs(0)))
  load_hf_weights(model, directory, mesh)
  return model, config


def _to_host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def save_hf_checkpoint(model: VLModel, directory: str, *, dtype: str | None = None,
                       max_shard_bytes: int = 4 << 30) -> None:
  """Writes `config.json` and safetensors shards that HF `from_pretrained` loads.

  One tensor is gathered to the host at a time and each shard is written as soon as it reaches
  `max_shard_bytes`, so the host holds at most one shard. LoRA adapters are not written (merge
  them first). Only process 0 writes (all processes must call, for the gathers).
  """
  from safetensors.flax import save_file  # handles bfloat16 (the numpy flavour cannot)

  os.makedirs(directory, exist_ok=True)
  write = parallel.is_process_0()
  config: VLConfig = model.config
  cpu = jax.local_devices(backend='cpu')[0]
  written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
  shard: dict[str, jax.Array] = {}
  size, total = 0, 0

  def flush():
    nonlocal shard, size
    if shard and write:
      tmp = os.path.join(directory, f'.shard-{len(written):05d}.tmp')
      save_file(shard, tmp, metadata={'format': 'pt'})
      written.append((tmp, list(shard)))
    shard, size = {}, 0

  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    mapped = hf_name(path)
    if mapped is None:
      continue
    name, layout = mapped
    arr = _to_host(var.get_value())
    if dtype is not None:
      arr = np.asarray(jnp.asarray(arr).astype(dtype))
    if layout == 'linear':
      arr = arr.T
    elif layout == 'patch':
      v = config.vision
      arr = arr.T.reshape(v.width, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if size and size + arr.nbytes > max_shard_bytes:
      flush()
    shard[name] = jax.device_put(np.ascontiguousarray(arr), cpu)
    size += arr.nbytes
    total += arr.nbytes
  flush()
  if not write:
    return
  hf_config = config.to_hf_dict()
  if dtype is not None:
    hf_config['dtype'] = dtype
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)
  if len(written) == 1:
    os.replace(written[0][0], os.path.join(directory, 'model.safetensors'))
    return
  weight_map = {}
  for i, (tmp, names) in enumerate(written):
    fname = f'model-{i + 1:05d}-of-{len(written):05d}.safetensors'
    os.replace(tmp, os.path.join(directory, fname))
    weight_map.update({k: fname for k in names})
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
