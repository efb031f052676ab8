"""EAGLE-style draft head on the live policy's hidden states (TLT's online drafter).

The head is ``n_layers`` decoder layers of the policy's architecture (the layer function of
:mod:`specrl.model`, with the head's own weights) on the input

  ``z_t = fc([rms_norm(e(x_{t+1})); h_t / g])``  (``[2D] -> [D]``)

where ``h_t`` is the policy's *final-norm* hidden state at position ``t`` (the vector its LM
head reads: :func:`specrl.model.forward` with ``return_hidden``), ``g`` the policy's
final-norm weight (so ``h_t / g`` is the unit-RMS residual direction) and ``e`` the policy's
embedding. The head's output at head position ``t`` is ``ĥ_{t+1} = rms_norm(y_t, g)`` (``y``:
its last layer's output, through the policy's own final norm), a prediction of ``h_{t+1}``;
the draft logits for ``x_{t+2}`` are the policy's LM head applied to it. The embedding,
final-norm weight and LM head are read from the *live* policy params on every call (never
copied, never trained here); the head's own params are small (``fc`` + its layers). Working
at the policy's feature scale matters on a real model (issue 16: SmolLM2-135M's ``|h|`` ~45
gives logits of tens of nats; a head off that manifold started at a soft CE of ~19 nats and
its training diverged); :func:`init_head` starts it at ``ĥ_{t+1} = h_t``.

Proposing at state ``pos`` (last committed token ``x_pos``; the policy's hidden states are
known for every position ``< pos``, :mod:`specrl.drafters.hooks` ``hidden_history``):

1. catch up: head positions ``fed .. pos - 1`` are fed with *true* features (``fed`` [B] is
   the head's own counter: its KV cache holds true features below it). After a verify
   pass ``pos - fed = n + 1 <= k + 1``: one window pass of ``T = k + 1``. After the prompt
   or a plain phase of the adaptive engine a ``while_loop`` first feeds chunks of
   ``catchup_chunk`` positions (:mod:`specrl.drafters.catchup`, shared with the model
   drafters). The window's output at head position ``pos - 1`` is
   ``ĥ_pos``, whose logits give draft 1.
2. draft ``i + 1`` comes from head position ``pos - 1 + i`` on ``fc([e(x̂_i); ĥ_{pos-1+i}])``
   -- the head's own predicted feature, ``T = 1`` each. Those cache slots hold predicted
   features until the next catch-up rewrites them with true ones (rollback by position,
   like the policy's cache).

So the head needs no extra policy forward: the prefill, plain steps and verify passes
already return the hidden states, and the rollout state keeps every committed position's.

Trees (``rollout.tree_nodes = N >= 2``): the head's top candidates, or children drawn from
it, grown best-first into a tree (:mod:`specrl.drafters.eagle_tree`).

Reduced vocabulary (``reduced_vocab = N > 0``): the head's logits are computed only for
``vocab_ids`` (N ids, e.g. the most frequent tokens of the policy's generations); every other
token gets ``NEG_INF``, so the draft distribution is exactly zero there. Still lossless:
rejection sampling only needs the drafts to be sampled from the q it is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from specrl import config as config_lib
from specrl import model as model_lib
from specrl import sampling
from specrl import sharding as shd
from specrl.drafters import catchup, eagle_tree
from specrl.drafters.eagle_head import (  # noqa: F401 (the head's math, re-exported)
  FEATURE_EPS,
  draft_params,
  head_config,
  head_input,
  head_layers,
  head_logical_axes,
  head_logits,
  head_logits_compact,
  head_output,
  init_head,
  predict_features,
)

SECTION = 'drafter.eagle'
MODES = ('frozen', 'cotrain', 'spot')
TREE_CHILDREN = ('top', 'sampled')


@dataclasses.dataclass(frozen=True)
class EagleConfig:
  """Options of the ``eagle`` drafter (config ``drafter.eagle.*``)."""

  n_layers: int = 1  # decoder layers of the head
  reduced_vocab: int = 0  # N > 0: draft over the N most frequent tokens only (0 = all)
  # frozen | cotrain (head update fused into the GRPO step) | spot (TLT: updates on a buffer
  # of recent GRPO steps' hidden states in the rollout's long tail; eagle_spot.py)
  mode: str = 'frozen'
  lr: float = 1e-3  # head optimizer (adamw)
  lr_warmup: int = 20  # head updates of linear lr warm-up (0 = none)
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  hidden_weight: float = 0.5  # weight of SmoothL1(ĥ_{t+1}, h_{t+1})
  ce_weight: float = 0.5  # weight of the soft CE against the policy's next-token distribution
  catchup_chunk: int = 32  # positions per catch-up pass (after the prompt / plain phases)
  warmup_steps: int = 0  # head updates on the policy's own generations before RL
  warmup_budget_s: float = 600.0  # wall-clock cap of the warm-up (stops early, says so)
  target_topk: int = 64  # warm-up CE against the policy's top-k (cached per batch; 0 = full)
  spot_buffer_steps: int = 4  # spot: GRPO steps of (hidden, tokens, mask) kept (a ring)
  spot_bucket: int = 4  # spot: update once the adaptive engine's bucket is <= this
  spot_budget_s: float = 5.0  # spot: seconds of head updates per RL step (added to it)
  spot_max_updates: int = 0  # spot: head updates per RL step at most (0 = budget only)
  spot_minibatch: int = 0  # spot: rows per update, from one buffered step (0 = all)
  # spot: positions kept per buffered row (the first ones: prompt and the answer's start);
  # the ring is N x B x this x D, fixed in the train state, so it must not follow the
  # token budget (a 32k budget would hold GBs); 0 = the whole buffer (seq_len)
  spot_max_len: int = 2048
  head_path: str = ''  # a head saved by save_head (e.g. after a warm-up); '' = fresh init
  # the sha256 (hex) head_path's file must have: a shipped or downloaded head is checked on
  # load, and a different file is refused naming both digests ('' = not checked)
  head_sha256: str = ''
  # draft trees (rollout.tree_nodes > 0): children per expanded node, the head's top ones
  tree_branch: int = 4
  # 'top': the head's top candidates, sample-and-compare (plain decoding's very tokens);
  # 'sampled' (T > 0): drawn from the head without replacement, recursive rejection sampling
  # (plain decoding's distribution, not its tokens). Module doc "Sampled trees".
  tree_children: str = 'top'

  def __post_init__(self):
    if self.n_layers < 1:
      raise ValueError(f'{SECTION}.n_layers must be >= 1, got {self.n_layers}')
    if self.reduced_vocab < 0:
      raise ValueError(f'{SECTION}.reduced_vocab must be >= 0 (0 = off), got {self.reduced_vocab}')
    if self.mode not in MODES:
      raise ValueError(f'{SECTION}.mode must be one of {MODES}, got {self.mode!r}')
    if self.tree_branch < 1:
      raise ValueError(
        f'{SECTION}.tree_branch must be >= 1 (children per expanded tree node; 1 = the '
        f"head's argmax chain), got {self.tree_branch}"
      )
    if self.tree_children not in TREE_CHILDREN:
      raise ValueError(
        f'{SECTION}.tree_children must be one of {TREE_CHILDREN}, got {self.tree_children!r}'
      )
    if self.spot_buffer_steps < 1 or self.spot_bucket < 1:
      raise ValueError(
        f'{SECTION}.spot_buffer_steps and spot_bucket must be >= 1, got '
        f'{self.spot_buffer_steps}, {self.spot_bucket}'
      )
    if not self.spot_budget_s > 0:
      raise ValueError(f'{SECTION}.spot_budget_s must be > 0 seconds, got {self.spot_budget_s}')
    if self.head_sha256 and not re.fullmatch(r'[0-9a-f]{64}', self.head_sha256):
      raise ValueError(
        f'{SECTION}.head_sha256 must be 64 lowercase hex digits (sha256sum of the file), got '
        f'{self.head_sha256!r}'
      )
    if self.head_sha256 and not self.head_path:
      raise ValueError(
        f'{SECTION}.head_sha256 checks the file of {SECTION}.head_path, which is empty'
      )
    if self.spot_max_len < 0 or self.spot_max_len == 1:
      raise ValueError(
        f'{SECTION}.spot_max_len must be 0 (the whole buffer) or >= 2 positions, got '
        f'{self.spot_max_len}'
      )
    if self.spot_max_updates < 0 or self.spot_minibatch < 0:
      raise ValueError(
        f'{SECTION}.spot_max_updates (0 = budget only) and spot_minibatch (0 = whole step) '
        f'must be >= 0, got {self.spot_max_updates}, {self.spot_minibatch}'
      )
    if (
      self.lr <= 0
      or self.catchup_chunk < 1
      or self.warmup_steps < 0
      or self.target_topk < 0
      or self.lr_warmup < 0
    ):
      raise ValueError(
        f'{SECTION}: lr and catchup_chunk must be > 0; warmup_steps, target_topk, lr_warmup >= 0'
      )

  @classmethod
  def from_config(cls, section) -> EagleConfig:
    return config_lib.from_config(cls, section, SECTION)


# ----------------------------------------------------------------------------- drafter


def _at(x, idx):
  """x [B, S, ...] at idx [B, T] (clipped to the buffer) -> [B, T, ...]."""
  idx = jnp.clip(idx, 0, x.shape[1] - 1)
  if x.ndim == 2:
    return jnp.take_along_axis(x, idx, axis=1)
  return jnp.take_along_axis(x, idx[..., None], axis=1)


class EagleDrafter(eagle_tree.EagleTrees):
  """The ``eagle`` drafter (see the module docstring). ``head_params`` / ``vocab_ids`` are
  the current head (set by training, warm-up or a checkpoint restore); ``params_from_policy``
  pairs them with the live policy's embedding and LM head."""

  name = 'eagle'
  derived = False  # the head's params are its own: passed to jitted steps as arguments
  wants_hidden = True
  hidden_history = True

  def __init__(
    self, model_cfg: model_lib.ModelConfig, ecfg: EagleConfig, head_params, vocab_ids=None
  ):
    self.model_cfg, self.ecfg = model_cfg, ecfg
    self.hcfg = head_config(model_cfg, ecfg.n_layers)
    self.head_params = head_params
    if ecfg.reduced_vocab and vocab_ids is None:
      vocab_ids = jnp.arange(min(ecfg.reduced_vocab, model_cfg.vocab_size), dtype=jnp.int32)
    self.vocab_ids = vocab_ids

  def params_from_policy(self, policy_params):
    return draft_params(policy_params, self.head_params, self.vocab_ids)

  def state_logical_axes(self):
    return {'cache': model_lib.cache_logical_axes(), 'fed': ('batch',)}

  def prefill(self, dp, prompt_tokens, prompt_len, buffer_len, mesh=None):
    """An empty head cache: the first proposal catches up on the prompt's features."""
    b = prompt_tokens.shape[0]
    cache = model_lib.init_cache(self.hcfg, b, buffer_len)
    return {'cache': cache, 'fed': jnp.zeros((b,), jnp.int32)}

  def _feed(self, dp, cache, seq_tokens, hist, hfrom, first, valid, mesh):
    """Feed head positions ``first[:, None] + arange(T)`` where ``valid`` [B, T] (true
    features from the policy's history); returns (outputs [B, T, D], cache)."""
    t = valid.shape[1]
    p = first[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    feats = _at(hist, p - hfrom[:, None])
    nxt = _at(seq_tokens, p + 1)
    write = jnp.where(valid, p, model_lib.cache_slots(cache))  # invalid: out of range, dropped
    x = head_input(dp, self.model_cfg, feats, nxt)
    y, cache = head_layers(
      dp['head']['layers'], self.hcfg, x, write, cache, mesh=mesh, rules=shd.DECODE_RULES
    )
    return head_output(dp, self.model_cfg, y), cache

  def _root(self, dp, state, seq_tokens, pos, w, ctx, mesh):
    """Catch the head up on the committed positions (in ``catchup_chunk`` passes, then one
    window of ``w`` ending at ``pos - 1``). Returns (ĥ_pos [B, D], head cache, fed)."""
    if ctx is None or ctx.hidden is None:
      raise ValueError('the eagle drafter needs the policy hidden states (ctx.hidden)')
    hist, hfrom = ctx.hidden, ctx.hidden_from

    def feed(cache, first, valid):
      return self._feed(dp, cache, seq_tokens, hist, hfrom, first, valid, mesh)[1]

    # head positions < pos - 1 in passes of catchup_chunk, until every row has at most one
    # window of them left (the window below feeds those and pos - 1)
    cache, fed = catchup.catch_up(
      feed, state['cache'], state['fed'], pos - 1, self.ecfg.catchup_chunk, slack=w - 1
    )
    valid = fed[:, None] + jnp.arange(w)[None, :] <= (pos - 1)[:, None]
    out, cache = self._feed(dp, cache, seq_tokens, hist, hfrom, fed, valid, mesh)
    return _at(out, (pos - 1 - fed)[:, None])[:, 0], cache, fed

  def propose(
    self, dp, state, seq_tokens, pos, k, seeds, sp, mesh=None, policy_cache=None, ctx=None
  ):
    cfg = self.model_cfg
    feat, cache, fed = self._root(dp, state, seq_tokens, pos, k + 1, ctx, mesh)  # ĥ_pos
    logit0 = head_logits(dp, cfg, feat)
    tok0 = sampling.sample_seeded(logit0, seeds, sp, row=0)

    def body(carry, i):
      cache, tok, feat = carry
      x = head_input(dp, cfg, feat[:, None], tok[:, None])
      x, cache = head_layers(
        dp['head']['layers'],
        self.hcfg,
        x,
        (pos - 1 + i)[:, None],
        cache,
        mesh=mesh,
        rules=shd.DECODE_RULES,
      )
      feat = head_output(dp, cfg, x[:, 0])
      lg = head_logits(dp, cfg, feat)
      nxt = sampling.sample_seeded(lg, seeds, sp, row=i)
      return (cache, nxt, feat), (nxt, lg)

    if k > 1:
      (cache, _, _), (toks, lgs) = jax.lax.scan(
        body, (cache, tok0, feat), jnp.arange(1, k, dtype=jnp.int32)
      )
      draft_tokens = jnp.concatenate([tok0[:, None], toks.T], axis=1)
      draft_logits = jnp.concatenate([logit0[:, None], jnp.swapaxes(lgs, 0, 1)], axis=1)
    else:
      draft_tokens, draft_logits = tok0[:, None], logit0[:, None]
    return draft_tokens, draft_logits, {'cache': cache, 'fed': jnp.maximum(fed, pos)}, policy_cache


# ----------------------------------------------------------------------------- head files

VOCAB_KEY = 'vocab_ids'
BF16_KEY = 'bfloat16_leaves'  # names of the leaves save_head stored as bfloat16 bits
HEAD_DTYPES = ('float32', 'bfloat16')


def _leaf_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def save_head(path: str, head_params, vocab_ids=None, dtype: str = 'float32') -> None:
  """Write a head (and its reduced vocabulary, if any) to ``path`` (an ``.npz``): a head
  warmed up once (``bench/eagle_alpha.py --real-alpha --save_head``) is reused by benchmarks
  and runs (``drafter.eagle.head_path``) instead of re-training it each time. Training runs
  checkpoint the head with orbax (``TrainState.drafter``); this is the portable single file.

  ``dtype='bfloat16'`` halves the file (SmolLM2's 1-layer head: 16.8 MB in float32, over
  the 16 MiB a device call brings back): floating leaves are rounded to bfloat16 and stored
  as their 16-bit patterns (``.npz`` has no bfloat16), named under :data:`BF16_KEY`;
  :func:`load_head` widens them back to the head's own dtype."""
  if dtype not in HEAD_DTYPES:
    raise ValueError(f'head dtype must be one of {HEAD_DTYPES}, got {dtype!r}')
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(head_params))[0]
  arrays, narrowed = {}, []
  for p, x in leaves:
    name, x = _leaf_name(p), np.asarray(x)
    if dtype == 'bfloat16' and np.issubdtype(x.dtype, np.floating):
      x = x.astype(jnp.bfloat16).view(np.uint16)
      narrowed.append(name)
    arrays[name] = x
  if narrowed:
    arrays[BF16_KEY] = np.asarray(narrowed)
  if vocab_ids is not None:
    arrays[VOCAB_KEY] = np.asarray(vocab_ids, np.int32)
  with open(path, 'wb') as f:  # np.savez(path) would append '.npz' to other names
    np.savez(f, **arrays)


def file_sha256(path: str) -> str:
  """Hex sha256 of a file (what ``sha256sum`` prints; ``drafter.eagle.head_sha256``)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def load_head(path: str, model_cfg: model_lib.ModelConfig, n_layers: int, sha256: str = ''):
  """(head params, vocab_ids or None) from a :func:`save_head` file, checked leaf by leaf
  against the head this model and ``n_layers`` would initialise: a head of another model,
  layer count or a file that is not a head is a ``ValueError`` naming what differs. With
  ``sha256`` (``drafter.eagle.head_sha256``) a file with another digest is refused first.
  Leaves saved in bfloat16 come back in the head's own dtype (their values bf16-rounded)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{SECTION}.head_path: no such file {path!r}')
  if sha256 and (got := file_sha256(path)) != sha256:
    raise ValueError(
      f'{SECTION}.head_path {path!r} has sha256 {got}, {SECTION}.head_sha256 expects '
      f'{sha256}: not the head this config names (a changed or partial file?)'
    )
  try:
    with np.load(path) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path}: not an eagle head file (.npz from eagle.save_head): {e}') from e
  for name in data.pop(BF16_KEY, np.asarray([], str)).tolist():
    if name not in data or data[name].dtype != np.uint16:
      raise ValueError(f'{path}: {BF16_KEY} names {name!r}, which holds no bfloat16 bits')
    data[name] = data[name].view(jnp.bfloat16)
  template = jax.eval_shape(lambda: init_head(model_cfg, n_layers, jax.random.key(0)))
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [_leaf_name(p) for p, _ in flat]
  missing = [n for n in names if n not in data]
  extra = sorted(set(data) - set(names) - {VOCAB_KEY})
  if missing or extra:
    raise ValueError(
      f'{path}: not a head of this model with n_layers={n_layers}: missing {missing}, '
      f'unexpected {extra}'
    )
  leaves = []
  for (_, spec), n in zip(flat, names, strict=True):
    if data[n].shape != spec.shape:
      raise ValueError(
        f'{path}: {n} has shape {data[n].shape}, this model with n_layers={n_layers} needs '
        f'{spec.shape} (a head of another model or layer count?)'
      )
    leaves.append(jnp.asarray(data[n], spec.dtype))
  vocab = data.get(VOCAB_KEY)
  if vocab is not None and (
    vocab.ndim != 1 or vocab.min() < 0 or vocab.max() >= model_cfg.vocab_size
  ):
    raise ValueError(f'{path}: vocab_ids must be ids < {model_cfg.vocab_size} in one row')
  return jax.tree.unflatten(treedef, leaves), None if vocab is None else jnp.asarray(vocab)


def saved_vocab_size(path: str) -> int:
  """The reduced vocabulary size a :func:`save_head` file was written with (0 = full),
  read without loading the head's weights."""
  with np.load(path) as f:
    return int(f[VOCAB_KEY].shape[0]) if VOCAB_KEY in f.files else 0


def make_eagle_drafter(
  section, model_cfg: model_lib.ModelConfig, rng, cls=EagleDrafter
) -> EagleDrafter:
  """The drafter from ``config.drafter.eagle``: its head loaded from ``head_path`` if set
  (its reduced vocabulary too; ``reduced_vocab`` must then equal its size), else initialised
  from ``rng``. ``cls``: :class:`EagleDrafter` or a subclass (a run's drafter is
  :class:`specrl.drafters.eagle_train.OnlineEagleDrafter`, which has a trainer)."""
  ecfg = EagleConfig.from_config(section)
  if not ecfg.head_path:
    return cls(model_cfg, ecfg, init_head(model_cfg, ecfg.n_layers, rng))
  head, vocab = load_head(ecfg.head_path, model_cfg, ecfg.n_layers, ecfg.head_sha256)
  n = 0 if vocab is None else int(vocab.shape[0])
  if vocab is not None and ecfg.reduced_vocab != n:
    raise ValueError(
      f'{SECTION}.reduced_vocab={ecfg.reduced_vocab} but {ecfg.head_path} was saved with a '
      f'reduced vocabulary of {n} ids: set {SECTION}.reduced_vocab={n}'
    )
  return cls(model_cfg, ecfg, head, vocab)
