"""Group-sibling suffix drafter: draft from the other answers to the same prompt.

In GRPO every prompt is answered G times side by side, and the G texts overlap heavily (the
problem restated, the same intermediate results, the same answer format); datasets are
revisited epoch after epoch, so earlier answers to the same prompt are known too. This
model-free drafter looks the row's last tokens up in

- the committed tokens of every row of its group (``group_ids``), its own text included,
  kept in the drafter's shared ``'rows'`` state (:mod:`specrl.drafters.hooks`): updated by
  ``observe`` after every commit (plain steps too), never compacted, so siblings that
  finished or were compacted away stay visible;
- optionally the last ``history`` answers to the same prompt id from earlier RL steps
  (:class:`HistoryStore`, host side; handed to the rollout as the drafter's params
  ``{'tokens': int32 [B, H, L], 'len': int32 [B, H]}``, indexed by ``seq_id``).

Proposal (:func:`suffix_next`): the longest suffix of the row's text of ``n_min..n_max``
tokens that occurs in the corpus with a committed next token; among those occurrences the
most frequent next token wins (ties: the most recent occurrence -- a later position of the
current rollout, then newer history answers); it is appended and the rule repeated up to
k tokens. Deterministic, so the drafter is ``one_hot``: it returns no draft logits and is
verified by the token-only path (:func:`specrl.kernels.verify_reference.verify_tokens_reference`).

Rows without a match of ``n_min`` tokens are not drafted: their draft tokens are -1 (and so
are the drafts after a position where the match runs out). Their verify pass then samples
the policy exactly as a plain step would (lossless), and the acceptance statistics count
only proposed drafts, so the adaptive chooser's alpha is the alpha of real drafts. The
batch still runs ``k + 1`` verify positions for such a row (the round is batch-synchronous);
what it saves is the wasted draft being counted and being accepted by chance into a worse
alpha estimate.

Cost per proposal: ``k`` lookups of ``O(B * G * S * n_max)`` compares (every row against
the buffers of the ``G <= max_group`` rows of its group, gathered by a sort of the group
ids; plus ``B * H * L * n_max`` for history; S: the corpus columns a decode loop carries,
the length bucket holding every committed position, not the budget:
:meth:`SuffixDrafter.shared_slot_axes`) and a ``[B, V]`` scatter-add for the
frequencies; no model. ``observe`` copies each row's committed prefix into the shared
state after every commit (one ``[B, S]`` scatter: the corpus is current in plain phases
too, with no rebuild when speculation starts).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from specrl.drafters import tree_build

NO_TOKEN = -1  # corpus padding and "not proposed"
# draft trees: one occurrence of the longest suffix match counts as this many occurrences
# of a shorter (>= n_min) match when ranking continuations (:meth:`SuffixDrafter.propose_tree`)
LONGEST_WEIGHT = 64
# the history arrays' width: a power of two >= the longest stored answer, at least this
MIN_HISTORY_WIDTH = 16


def _shift(x: jax.Array, o: int) -> jax.Array:
  """x[..., j - o] (o > 0: right shift, -1 in front; o < 0: left shift, -1 at the end)."""
  s = x.shape[-1]
  pad = [(0, 0)] * (x.ndim - 1)
  if o >= 0:
    return jnp.pad(x[..., : s - o], pad + [(o, 0)], constant_values=NO_TOKEN)
  return jnp.pad(x[..., -o:], pad + [(0, -o)], constant_values=NO_TOKEN)


def match_lengths(window: jax.Array, wlen: jax.Array, corpus: jax.Array) -> jax.Array:
  """Length of the common suffix of the query and the corpus ending at every position.

  window: int32 [B, N] the query's last N tokens (the last one at ``[:, -1]``); only the
  last ``wlen [B]`` are valid. corpus: int32 [Bc, C, S] (Bc = B or 1), ``NO_TOKEN`` where
  empty. Returns int32 [B, C, S]: ``ml[b, c, j] = max m <= N`` with
  ``corpus[c, j - o] == window[b, -1 - o]`` for all ``o < m``.
  """
  n = window.shape[1]
  alive = None
  ml = jnp.zeros((window.shape[0],) + corpus.shape[1:], jnp.int32)
  for o in range(n):
    w = window[:, n - 1 - o]
    eq = _shift(corpus, o) == w[:, None, None]
    eq &= ((o < wlen) & (w >= 0))[:, None, None]
    alive = eq if alive is None else alive & eq
    ml += alive.astype(jnp.int32)
  return ml


def suffix_next(window, wlen, corpora, n_min: int, vocab: int):
  """One proposal step: the continuation of the query by the longest-suffix rule.

  corpora: list of (tokens [Bc, C, S], ok bool [B, C, S], recency int32 [B or 1, C, S]);
  ``ok[b, c, j]``: position j of corpus row c may be matched for row b (same group, next
  token committed); recency: larger = more recent (ties of frequency go to it).
  Returns (token int32 [B], found bool [B], match length int32 [B]).
  """
  b = window.shape[0]
  mls, nxts, oks, recs = [], [], [], []
  for toks, ok, rec in corpora:
    mls.append(jnp.where(ok, match_lengths(window, wlen, toks), 0).reshape(b, -1))
    nxts.append(jnp.broadcast_to(_shift(toks, -1), ok.shape).reshape(b, -1))
    oks.append(ok.reshape(b, -1))
    recs.append(jnp.broadcast_to(rec, ok.shape).reshape(b, -1))
  ml, nxt, rec = (jnp.concatenate(x, axis=1) for x in (mls, nxts, recs))
  best = jnp.max(ml, axis=1)  # [B]
  found = best >= n_min
  sel = (ml == best[:, None]) & found[:, None] & (nxt >= 0)
  tok = jnp.where(sel, nxt, 0)
  counts = (
    jnp.zeros((b, vocab), jnp.int32).at[jnp.arange(b)[:, None], tok].add(sel.astype(jnp.int32))
  )
  freq = jnp.where(sel, jnp.take_along_axis(counts, tok, axis=1), -1)
  top = sel & (freq == jnp.max(freq, axis=1, keepdims=True))
  i = jnp.argmax(jnp.where(top, rec, jnp.iinfo(jnp.int32).min), axis=1)
  token = jnp.take_along_axis(tok, i[:, None], axis=1)[:, 0]
  return jnp.where(found, token, NO_TOKEN).astype(jnp.int32), found, best


def group_members(groups: jax.Array, gid: jax.Array, size: int, own: jax.Array | None = None):
  """The rows of each query row's group: ``(member int32 [B, size], valid bool [B, size])``,
  the first ``size`` rows (by row index) with ``groups[r] == gid[b]``. groups [R], gid [B].
  A stable sort of the group ids and a binary search: ``O(R log R)``, no ``[B, R]`` mask.

  ``own`` (int32 [B], optional): each query row's own row index. A group larger than
  ``size`` would leave a row past the first ``size`` without its own text, so where ``own``
  is not among the first ``size`` it takes the last slot (an ``own >= R``, a padding row,
  never does)."""
  r = groups.shape[0]
  order = jnp.argsort(groups, stable=True)
  sorted_groups = groups[order]
  start = jnp.searchsorted(sorted_groups, gid, side='left')
  idx = start[:, None] + jnp.arange(size)[None, :]
  at = jnp.minimum(idx, r - 1)
  valid = (idx < r) & (sorted_groups[at] == gid[:, None])
  member = order[at].astype(jnp.int32)
  if own is not None:
    own = own.astype(jnp.int32)
    missing = ~jnp.any(valid & (member == own[:, None]), axis=1) & (own < r)
    member = member.at[:, -1].set(jnp.where(missing, own, member[:, -1]))
    valid = valid.at[:, -1].set(valid[:, -1] | missing)
  return member, valid


class HistoryStore:
  """The last ``per_prompt`` answers to each prompt id, for at most ``max_prompts`` ids
  (least recently recorded dropped first). Host side; checkpointed via
  ``host_state`` / ``load_host_state`` (numpy arrays: stored as checkpoint arrays)."""

  def __init__(self, per_prompt: int, max_prompts: int):
    self.per_prompt, self.max_prompts = per_prompt, max_prompts
    self.answers: collections.OrderedDict[int, list[np.ndarray]] = collections.OrderedDict()

  def record(self, prompt_ids, responses, lengths) -> None:
    """Add answers ``responses [B, N]`` (first ``lengths [B]`` tokens) under ``prompt_ids``
    (ids < 0, unknown prompts, are skipped)."""
    rows = zip(np.asarray(prompt_ids), np.asarray(responses), np.asarray(lengths), strict=True)
    for pid, resp, n in rows:
      pid = int(pid)
      if pid < 0 or self.per_prompt <= 0:
        continue
      lst = self.answers.pop(pid, [])
      lst = (lst + [np.asarray(resp[: int(n)], np.int32)])[-self.per_prompt :]
      self.answers[pid] = lst
      while len(self.answers) > self.max_prompts:
        self.answers.popitem(last=False)

  def arrays(self, prompt_ids, width: int) -> dict:
    """``{'tokens': int32 [B, H, W], 'len': int32 [B, H]}``: row b's stored answers,
    newest first, cut to ``width`` tokens, ``NO_TOKEN``-padded (H = ``per_prompt``). W: the
    power of two (at least :data:`MIN_HISTORY_WIDTH`) holding the longest of them, at most
    ``width`` -- every lookup scans W columns, so they follow the answers' lengths, not the
    budget. Exact: the columns cut are empty (never matched) and the ranking of the stored
    positions (:meth:`SuffixDrafter._corpora`) is the same at any width that holds them."""
    ids = np.asarray(prompt_ids)
    h = max(self.per_prompt, 1)
    longest = max(
      (min(len(a), width) for pid in ids for a in self.answers.get(int(pid), [])), default=0
    )
    width = min(width, max(MIN_HISTORY_WIDTH, 1 << max(longest - 1, 0).bit_length()))
    toks = np.full((len(ids), h, width), NO_TOKEN, np.int32)
    lens = np.zeros((len(ids), h), np.int32)
    for b, pid in enumerate(ids):
      for i, a in enumerate(reversed(self.answers.get(int(pid), []))):
        a = a[:width]
        toks[b, i, : len(a)] = a
        lens[b, i] = len(a)
    return {'tokens': toks, 'len': lens}

  def nbytes(self) -> int:
    return sum(a.nbytes for lst in self.answers.values() for a in lst)

  def host_state(self) -> dict:
    # numpy arrays: the checkpoint stores them as arrays (host_arrays), not JSON lists
    return {
      'answers': [
        [pid, [np.asarray(a, np.int32) for a in lst]] for pid, lst in self.answers.items()
      ]
    }

  def load_host_state(self, d: dict) -> None:
    self.answers = collections.OrderedDict(
      (int(pid), [np.asarray(a, np.int32) for a in lst]) for pid, lst in d['answers']
    )


class SuffixDrafter:
  """``suffix``: see the module docstring. ``history`` answers per prompt id (0 = siblings
  only), at most ``history_prompts`` prompt ids stored; each row drafts from at most
  ``max_group`` rows of its group (the first by row index, GRPO's G; a row beyond them
  takes the last slot, so every row always sees its own text)."""

  name = 'suffix'
  derived = False  # model-free; its "params" are the history arrays (or None)
  wants_context = True
  one_hot = True  # deterministic: token-only verification, draft_tokens < 0 = not proposed

  def __init__(
    self,
    vocab_size: int,
    n_min: int = 2,
    n_max: int = 8,
    history: int = 0,
    history_prompts: int = 4096,
    max_group: int = 16,
  ):
    if not 1 <= n_min <= n_max:
      raise ValueError(f'drafter.suffix needs 1 <= n_min <= n_max, got {n_min}, {n_max}')
    if history < 0 or history_prompts < 1:
      raise ValueError(
        f'drafter.suffix.history must be >= 0 and history_prompts >= 1, got {history}, '
        f'{history_prompts}'
      )
    if max_group < 1:
      raise ValueError(f'drafter.suffix.max_group must be >= 1, got {max_group}')
    self.vocab_size, self.n_min, self.n_max, self.history = vocab_size, n_min, n_max, history
    self.max_group = max_group
    self.store = HistoryStore(history, history_prompts)

  # -- history (host side)

  def history_params(self, prompt_ids, width: int, draft_params=None):
    """Draft params of a rollout of rows ``prompt_ids [B]``: their stored answers as arrays
    (None without history: the drafter then drafts from the siblings only). ``draft_params``
    (the hybrid's derived params; None here: this drafter has no others) is ignored."""
    if self.history <= 0:
      return None
    return jax.tree.map(jnp.asarray, self.store.arrays(prompt_ids, width))

  def record(self, prompt_ids, responses, lengths) -> None:
    self.store.record(prompt_ids, responses, lengths)

  def memory_bytes(self) -> int:
    return self.store.nbytes()

  def host_state(self) -> dict:
    return self.store.host_state()

  def load_host_state(self, d: dict) -> None:
    self.store.load_host_state(d)

  # -- protocol

  def params_from_policy(self, policy_params):
    return None

  def state_logical_axes(self):
    return None

  def prefill(self, draft_params, prompt_tokens, prompt_len, buffer_len, mesh=None):
    return None

  def init_shared(self, batch: int, seq_len: int):
    return {
      'tokens': jnp.full((batch, seq_len), NO_TOKEN, jnp.int32),  # committed text per row
      'end': jnp.full((batch,), -1, jnp.int32),  # position of the last committed token
      'group': jnp.full((batch,), jnp.iinfo(jnp.int32).min, jnp.int32),
    }

  def shared_slot_axes(self):
    """The corpus is by position (``hooks.windows_shared``): a decode loop carries its
    first ``w`` columns, ``w`` a length bucket holding every row's committed text (finished
    rows' too), so :meth:`propose` scans ``w``, not ``seq_len``, columns. Exact: nothing
    past a row's last committed position is matched (``ok``) or written (``observe``)."""
    return {'tokens': 1, 'end': -1, 'group': -1}

  def observe(self, dp, shared, tokens, pos_before, pos_after, seq_id, group_ids, prompt_ids):
    """Copy every row's committed text (positions <= pos_after) into its original row."""
    s = shared['tokens'].shape[1]
    rows = jnp.where(jnp.arange(s)[None, :] <= pos_after[:, None], tokens[:, :s], NO_TOKEN)
    return {
      'tokens': shared['tokens'].at[seq_id].set(rows.astype(jnp.int32), mode='drop'),
      'end': shared['end'].at[seq_id].set(pos_after.astype(jnp.int32), mode='drop'),
      'group': shared['group'].at[seq_id].set(group_ids.astype(jnp.int32), mode='drop'),
    }

  def _corpora(self, dp, seq_tokens, pos, ctx):
    """The corpora of :func:`suffix_next` for a batch: the group's rows, then history."""
    if ctx is None or ctx.shared is None:  # outside a rollout: each row its own text
      b = pos.shape[0]
      seq_id = jnp.arange(b, dtype=jnp.int32)
      gid = seq_id
      s = seq_tokens.shape[1]
      text = jnp.where(jnp.arange(s)[None, :] <= pos[:, None], seq_tokens, NO_TOKEN)
      shared = {'tokens': text, 'end': pos, 'group': seq_id}
    else:
      seq_id, gid, shared = ctx.seq_id, ctx.group_ids, ctx.shared
    member, valid = group_members(shared['group'], gid, self.max_group, own=seq_id)  # [B, G]
    rows, s = shared['tokens'].shape
    j = jnp.arange(s, dtype=jnp.int32)[None, None, :]
    ok = valid[:, :, None] & (j < shared['end'][member][:, :, None])  # next token committed
    rec = j * rows + member[:, :, None]  # later position = newer (then the higher row)
    corpora = [(shared['tokens'][member], ok, rec.astype(jnp.int32))]
    if dp is not None:
      hist = dp['tokens'][jnp.minimum(seq_id, dp['tokens'].shape[0] - 1)]  # [B, H, L]
      hlen = dp['len'][jnp.minimum(seq_id, dp['len'].shape[0] - 1)]  # [B, H]
      h, w = hist.shape[1:]
      hj = jnp.arange(w, dtype=jnp.int32)
      hok = hj[None, None, :] < hlen[:, :, None] - 1
      # below every current occurrence; newer answers (h = 0) and later positions first
      hrec = -(jnp.arange(h)[:, None] * w + (w - hj)[None, :]) - 1
      corpora.append((hist, hok, hrec[None].astype(jnp.int32)))
    return corpora

  def _window(self, seq_tokens, pos):
    """The last ``n_max`` committed tokens of each row up to ``pos`` (``NO_TOKEN`` before
    position 0): (window int32 [B, n_max], its valid length [B]) -- the suffix a match
    starts from, for :meth:`propose` and :meth:`propose_tree` alike."""
    n, s = self.n_max, seq_tokens.shape[1]
    idx = pos[:, None] - (n - 1) + jnp.arange(n)[None, :]
    window = jnp.take_along_axis(seq_tokens, jnp.clip(idx, 0, s - 1), axis=1)
    window = jnp.where(idx >= 0, window, NO_TOKEN).astype(jnp.int32)
    return window, jnp.minimum(pos + 1, n)

  def propose(
    self, draft_params, state, seq_tokens, pos, k, seeds, sp, mesh=None, policy_cache=None, ctx=None
  ):
    corpora = self._corpora(draft_params, seq_tokens, pos, ctx)
    n = self.n_max
    window, wlen = self._window(seq_tokens, pos)
    going = jnp.ones(pos.shape, bool)
    drafts = []
    for _ in range(k):
      tok, found, _ = suffix_next(window, wlen, corpora, self.n_min, self.vocab_size)
      going &= found
      tok = jnp.where(going, tok, NO_TOKEN)
      drafts.append(tok)
      window = jnp.concatenate([window[:, 1:], tok[:, None]], axis=1)
      wlen = jnp.minimum(wlen + 1, n)
    return jnp.stack(drafts, axis=1), None, state, policy_cache

  def propose_tree(
    self,
    draft_params,
    state,
    seq_tokens,
    pos,
    n_nodes,
    depth_cap,
    seeds,
    sp,
    mesh=None,
    ctx=None,
    branch=None,
  ):
    """A draft tree of ``n_nodes`` (root included) per row: every continuation of the
    occurrences of the row's suffix matches of ``>= n_min`` tokens, expanded best-first by
    empirical frequency under ``depth_cap`` (None: ``n_nodes - 1``) and at most ``branch``
    children per node (None: no cap;
    :func:`specrl.drafters.tree_build.continuation_tree`), an occurrence of the longest
    match (the one :meth:`propose` follows) weighing :data:`LONGEST_WEIGHT` shorter ones: the
    longest match's continuations first, the shorter matches' fill the remaining nodes.
    Rows without a match of ``n_min`` tokens get an empty tree (the round then samples the
    policy as a plain step does).
    Returns (tokens, parents, depth int32 [B, n_nodes], state)."""
    corpora = self._corpora(draft_params, seq_tokens, pos, ctx)
    window, wlen = self._window(seq_tokens, pos)
    dcap = min(depth_cap or n_nodes - 1, n_nodes - 1)
    b = pos.shape[0]
    mls = [jnp.where(ok, match_lengths(window, wlen, toks), 0) for toks, ok, _ in corpora]
    best = jnp.max(jnp.stack([jnp.max(ml.reshape(b, -1), axis=1) for ml in mls]), axis=0)
    found = best >= self.n_min
    conts, weights = [], []
    for (toks, ok, _), ml in zip(corpora, mls, strict=True):
      occ = (ml >= self.n_min) & found[:, None, None] & ok
      c = [jnp.broadcast_to(_shift(toks, -(d + 1)), ok.shape) for d in range(dcap)]
      c = jnp.where(occ[..., None], jnp.stack(c, axis=-1), NO_TOKEN)  # [B, C, S, D]
      conts.append(c.reshape(b, -1, dcap))
      # an occurrence of the longest match counts LONGEST_WEIGHT shorter ones
      weights.append(jnp.where(ml == best[:, None, None], LONGEST_WEIGHT, 1).reshape(b, -1))
    tokens, parents, depth = tree_build.continuation_tree(
      jnp.concatenate(conts, 1), n_nodes, jnp.concatenate(weights, 1), branch=branch
    )
    return tokens, parents, depth, state
