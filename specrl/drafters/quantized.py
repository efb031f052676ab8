"""The self-speculative quantized drafter: an int8/int4 copy of the *live* policy.

``draft_params = quantize_params(policy_params)`` is a pure function of the policy
params, evaluated inside the jitted step that produces the next rollout's params
(``derive_in_train_step``: :func:`specrl.drafters.hooks.derives_in_train_step`), so the
drafter never drifts from the policy, needs no training, and is never checkpointed. The
drafter runs the *same* model code (:func:`specrl.model.forward`): quantized leaves carry
their own ``qeinsum``.

Options (config ``drafter.quantized.*``): every field of :class:`specrl.quant.QuantConfig`
(``bits`` 8|4, ``group_size`` (0 = auto: int4 takes the largest divisor <= 128 of each
contracting dim, int8 one scale per channel), ``backend`` jnp|aqt|qwix,
``quantize_embeddings``, ``quantize_lm_head``, ``act_bits`` (0 = weight-only), ``fp8``
('' = off), ``scale_dtype``), plus ``share_kv`` (read the policy's KV cache instead of
keeping a second one).
"""

from __future__ import annotations

from specrl import config as config_lib
from specrl import model as model_lib
from specrl import quant
from specrl.drafters.model_drafter import ModelDrafter

SECTION = 'drafter.quantized'


def quant_config(section) -> quant.QuantConfig:
  """QuantConfig from the ``drafter.quantized`` section (0 / '' mean auto / off there,
  since ml_collections fields cannot be None and still be set from the command line)."""
  return config_lib.from_config(
    quant.QuantConfig,
    section,
    SECTION,
    ignore=('share_kv',),
    group_size=section.get('group_size', 0) or 'auto',
    act_bits=section.get('act_bits', 0) or None,
    fp8=section.get('fp8', '') or None,
  )


def contracting_dims(cfg: model_lib.ModelConfig) -> tuple[int, ...]:
  """The dims the policy's matmuls contract over: d_model (wq/wk/wv/w_gate/w_up, the
  embedding table and head), heads * head_dim (wo), d_ff (w_down)."""
  return (cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.d_ff)


def make_quantized_drafter(section, model_cfg: model_lib.ModelConfig) -> ModelDrafter:
  """The drafter, with the quantization settings validated against the model's shapes."""
  qcfg = quant_config(section)
  quant.check_group_size(qcfg, contracting_dims(model_cfg), f'{SECTION}.group_size')
  return ModelDrafter(
    'quantized',
    model_cfg,
    derive=lambda p: quant.quantize_params(p, qcfg),
    share_kv=bool(section.get('share_kv', False)),
    derive_in_train_step=True,
  )
