"""The self-speculative quantized drafter: an int8/int4 copy of the *live* policy.

``draft_params = quantize_params(policy_params)`` is a pure function of the policy
params, evaluated inside the jitted step that produces the next rollout's params (see
:func:`specrl.train.derive_draft_params`), so the drafter never drifts from the policy,
needs no training, and is never checkpointed. The drafter runs the *same* model code
(:func:`specrl.model.forward`): quantized leaves carry their own ``qeinsum``.

Options (config ``drafter.*``): ``bits`` 8|4, ``group_size`` (0 = per channel; int4
defaults to 128), ``backend`` jnp|aqt|qwix, ``quantize_embeddings``, ``act_bits``,
``share_kv`` (read the policy's KV cache instead of keeping a second one).
"""

from __future__ import annotations

from specrl import model as model_lib
from specrl import quant
from specrl.drafters.model_drafter import ModelDrafter


def quant_config(dc) -> quant.QuantConfig:
  """QuantConfig from the ``drafter`` config section (other drafters' keys ignored)."""
  d = dict(dc)
  group = d.get('group_size', 0)
  return quant.QuantConfig(
    bits=d.get('bits', 8),
    group_size=('auto' if group == 0 and d.get('bits') == 4 else (group or None)),
    backend=d.get('backend', 'jnp'),
    quantize_embeddings=d.get('quantize_embeddings', False),
    quantize_lm_head=d.get('quantize_embeddings', False),
    act_bits=d.get('act_bits') or None,
  )


def make_quantized_drafter(config, model_cfg: model_lib.ModelConfig) -> ModelDrafter:
  qcfg = quant_config(config.drafter)
  share = bool(config.drafter.get('share_kv', False))
  return ModelDrafter(
    'quantized', model_cfg, derive=lambda p: quant.quantize_params(p, qcfg), share_kv=share
  )
