"""The Pallas verify kernel against the jnp reference (jax Pallas-ops test style).

The contract is bit-for-bit: identical ``num_accepted`` and ``tokens`` on the same seeds,
``logprobs`` equal up to f32 rounding of the normalisers. Runs in interpret mode on CPU
(``INTERPRET``); the TPU layout runs under the TPU interpreter. Export tests show each
layout lowers for its hardware target (Triton for CUDA, Mosaic for TPU) without one.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from specrl.decoding import verify as dispatch
from specrl.kernels import verify as kernel_lib
from specrl.kernels import verify_reference as verify_lib
from specrl.sampling import NEG_INF, SamplingParams
from tests.jit_util import run


def _ref(*args):
  *arrays, sp = args
  return run(verify_lib.verify_reference, *arrays, sp=sp)


def make_inputs(
  batch, k, vocab, seed, dtype=jnp.float32, onehot_draft=False, greedy=False, ties=False, same=False
):
  """Random logits (3 * N(0, 1), never all zeros) and a mix of likely and random drafts.

  Half the drafts are the argmax of the draft logits (target + noise, so near the target
  argmax and often accepted), half are uniform. ``onehot_draft``: deterministic proposal
  (draft logits 0 at the token, NEG_INF elsewhere). ``greedy``: likely drafts are the
  exact target argmax so greedy acceptance happens. ``ties``: logits rounded to a coarse
  grid (offset so none is zero), so argmax ties across blocks and chunks are common.
  ``same``: draft logits equal the target's (q == p), so a draft outside the top-k set
  is rejected with an all-zero residual (the fallback to p).
  """
  rng = np.random.default_rng(seed)
  target = 3.0 * rng.standard_normal((batch, k + 1, vocab)).astype(np.float32)
  if ties:
    target = np.round(target) + np.float32(0.25)
  draft = target[:, :k] + rng.standard_normal((batch, k, vocab)).astype(np.float32)
  likely = np.argmax(target[:, :k] if greedy else draft, axis=-1)
  x = np.where(rng.random((batch, k)) < 0.5, likely, rng.integers(0, vocab, (batch, k)))
  x = x.astype(np.int32)
  if same:
    draft = target[:, :k]
  if onehot_draft:
    draft = np.where(np.arange(vocab) == x[..., None], 0.0, NEG_INF).astype(np.float32)
  seeds = rng.integers(0, 2**32, size=batch, dtype=np.uint32)
  return (jnp.asarray(target, dtype), jnp.asarray(draft, dtype), jnp.asarray(x), jnp.asarray(seeds))


def assert_same(got, want, k, check_mix):
  n = np.asarray(want.num_accepted)
  np.testing.assert_array_equal(np.asarray(got.num_accepted), n)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(
    np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-5, atol=1e-5
  )
  if check_mix:  # the case exercises both accepts and rejections
    assert (n > 0).any() and (n < k).any(), n


T07 = SamplingParams(temperature=0.7)
T1 = SamplingParams(temperature=1.0)
GREEDY = SamplingParams(temperature=0.0)
FILTERED = SamplingParams(temperature=0.8, top_k=40, top_p=0.9)

# (batch, k, vocab, block_v, chunk_v, sp, dtype, input kind: '', 'onehot', 'ties', 'same')
CASES = [
  (33, 8, 1000, 256, 512, T07, jnp.float32, ''),  # 2 chunks, masked tail block
  (1, 1, 1000, 128, 384, T1, jnp.float32, ''),  # 3 chunks of 3 blocks
  (33, 1, 300, 128, None, T1, jnp.bfloat16, ''),
  (33, 8, 1000, 256, 512, GREEDY, jnp.float32, 'ties'),
  (1, 8, 300, 256, None, GREEDY, jnp.bfloat16, ''),
  (33, 8, 300, 256, None, FILTERED, jnp.float32, 'ties'),  # top-k ties at threshold
  (33, 4, 300, 128, None, SamplingParams(0.7, top_k=5), jnp.float32, 'onehot'),  # n-gram q
  (33, 4, 300, 256, None, SamplingParams(1.0, top_k=5), jnp.float32, 'same'),  # q == p
]


def _case_id(c):
  b, k, v, blk, chunk, sp, dtype, kind = c
  return (
    f'B{b}-k{k}-V{v}-blk{blk}-chunk{chunk}-T{sp.temperature}-topk{sp.top_k}'
    f'-topp{sp.top_p}-{jnp.dtype(dtype).name}{"-" + kind if kind else ""}'
  )


class TestVerifyKernel:
  """GPU (Triton) layout; on CPU in interpret mode."""

  INTERPRET = True
  LAYOUT = 'gpu'

  @pytest.mark.parametrize('case', CASES, ids=_case_id)
  def test_matches_reference(self, case):
    batch, k, vocab, block_v, chunk_v, sp, dtype, kind = case
    args = make_inputs(
      batch,
      k,
      vocab,
      seed=batch * 1000 + k * 10 + vocab,
      dtype=dtype,
      onehot_draft=kind == 'onehot',
      greedy=sp.greedy,
      ties=kind == 'ties',
      same=kind == 'same',
    )
    got = run(
      dispatch.verify,
      *args,
      sp=sp,
      impl='pallas',
      interpret=self.INTERPRET,
      layout=self.LAYOUT,
      block_v=block_v,
      chunk_v=chunk_v,
    )
    assert_same(got, _ref(*args, sp), k, check_mix=batch > 1)


class TestVerifyKernelTPUInterpret:
  """TPU (Mosaic) layout under the TPU interpreter (simulated VMEM, DMAs, races)."""

  INTERPRET = pltpu.InterpretParams(detect_races=True)
  LAYOUT = 'tpu'

  @pytest.mark.parametrize(
    'case',
    [
      # V padded to 23 x 128, 2 chunks of 16 rows, the second a partial block.
      (2, 3, 2900, 1024, 2048, FILTERED, jnp.float32, ''),
      (2, 4, 2944, 2048, None, GREEDY, jnp.bfloat16, 'ties'),
    ],
    ids=_case_id,
  )
  def test_matches_reference(self, case):
    batch, k, vocab, block_v, chunk_v, sp, dtype, kind = case
    args = make_inputs(
      batch, k, vocab, seed=7 + k, dtype=dtype, greedy=sp.greedy, ties=kind == 'ties'
    )
    pltpu.reset_tpu_interpret_mode_state()  # no race state left from an earlier kernel
    got = run(
      kernel_lib.verify_pallas,
      *args,
      sp=sp,
      interpret=self.INTERPRET,
      layout=self.LAYOUT,
      block_v=block_v,
      chunk_v=chunk_v,
    )
    assert_same(got, _ref(*args, sp), k, check_mix=False)
    races = _race_detection_state()
    assert not races.races_found, 'the TPU interpreter detected a data race'

  def test_race_detector_sees_a_race(self):
    """Positive control: the same flag goes up for a kernel with a deliberate race (a VMEM
    buffer read while the DMA that writes it is still in flight), so a clean verdict above
    is the detector's, not a flag that can never be set."""

    def racy(x_hbm, o_ref, buf, sem):
      copy = pltpu.make_async_copy(x_hbm, buf, sem)
      copy.start()
      o_ref[...] = buf[...]  # read before copy.wait(): races with the DMA's write
      copy.wait()

    x = jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)
    call = pl.pallas_call(
      racy,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
      scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA],
      interpret=self.INTERPRET,
    )
    pltpu.reset_tpu_interpret_mode_state()
    jax.block_until_ready(jax.jit(call)(x))
    assert _race_detection_state().races_found, 'the race detector missed a deliberate race'


# The TPU interpreter exposes its race verdict only through this private module's global.
TPU_INTERPRET_MODULE = 'jax._src.pallas.mosaic.interpret.interpret_pallas_call'


def _race_detection_state():
  """The TPU interpreter's race-detection state after a kernel ran with detect_races=True.

  Skips (naming the module) when this jax has moved the private module, so the race check is
  reported as not done rather than passing vacuously; fails when the module is there but no
  detection state was recorded (the check would otherwise prove nothing).
  """
  try:
    tpu_interpret = importlib.import_module(TPU_INTERPRET_MODULE)
  except ImportError as e:
    pytest.skip(
      f'race check not run: jax {jax.__version__} has no private module {TPU_INTERPRET_MODULE} '
      f'(the TPU interpreter race flag moved): {e}'
    )
  races = getattr(tpu_interpret, 'races', None)
  assert races is not None and hasattr(races, 'races_found'), (
    f'{TPU_INTERPRET_MODULE}.races holds no race-detection state after an interpreted kernel '
    f'with detect_races=True (got {races!r}): the race check cannot be trusted'
  )
  return races


# ----------------------------------------------------------------------------------
# Lowering for the real targets, without the hardware.
# ----------------------------------------------------------------------------------

_TARGETS = {'cuda': ('gpu', '__gpu$xla.gpu.triton'), 'tpu': ('tpu', 'tpu_custom_call')}


@pytest.mark.parametrize('sp', [T07, GREEDY, FILTERED], ids=['T0.7', 'greedy', 'topk-topp'])
@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_exports_for_platform(platform, sp):
  layout, target = _TARGETS[platform]
  b, k, v = 256, 8, 152064  # chunks of 149 blocks: not a power of two
  shapes = (
    jax.ShapeDtypeStruct((b, k + 1, v), jnp.bfloat16),
    jax.ShapeDtypeStruct((b, k, v), jnp.bfloat16),
    jax.ShapeDtypeStruct((b, k), jnp.int32),
    jax.ShapeDtypeStruct((b,), jnp.uint32),
  )
  f = functools.partial(kernel_lib.verify_pallas, sp=sp, interpret=False, layout=layout)
  # Triton calls carry no serialization-compatibility guarantee; we only check lowering.
  checks = [export.DisabledSafetyCheck.custom_call(target)] if platform == 'cuda' else []
  try:
    exp = export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(*shapes)
  except Exception as e:  # pylint: disable=broad-except
    if 'Cannot lower pallas_call on platform' in str(e) or isinstance(e, ImportError):
      pytest.skip(f'this jax cannot lower Pallas for {platform} on a CPU-only machine: {e}')
    raise
  text = exp.mlir_module()
  want_calls = 1 if sp.greedy else 2  # greedy skips the sampling pass
  assert text.count(f'custom_call @{target}') == want_calls, text[:2000]
