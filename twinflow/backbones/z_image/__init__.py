"""Z-Image (Turbo) backbone.

What it provides, numbered as the items of "What a backbone provides" in the backbone-seam design
note:

2. build: :class:`~.transformer.TwinFlowZImageTransformer` (diffusers' ``ZImageTransformer2DModel`` plus
   ``t_embedder_2``; ``from_pretrained`` of a plain or a TwinFlow folder) and
   :class:`~.backbone.ZImageBackbone`, the callable ``F(x_t, t, tt, cond)`` with signed TwinFlow times
   (mapped to Z-Image's clock as the reference does; the output negated);
3. its dual-time rule (in :mod:`.transformer`): second embedder input ``tt - t``, coefficient
   ``|t - tt|``, time scale ``t_scale`` (1000), no extra input, float64 time arithmetic;
4. conditioning: :class:`~.condition.ZImageCondition` (``index`` / ``cat``) and
   :class:`~.encoders.ZImageConditioner` (Qwen3 text encoder; negative prompt ``""``);
5. latent codec: the 16-channel (Flux) ``AutoencoderKL`` (``twinflow.backbones.text_to_image``);
7. LoRA: :data:`~.lora.LORA_TARGET_MODULES`;
9. export and load: diffusers' folder layout; the published TwinFlow-Z-Image-Turbo layout
   (``t_embedder_2.*`` beside the base keys) loads without remapping;
10. tiny local builds: :mod:`.tiny` (transformer config), :mod:`.tiny_encoders` (Qwen3 encoder with a
    locally trained tokenizer and chat template, VAE).

Wired through the seam in :mod:`.spec` (``model.family: z_image``): the config (:mod:`.config`), the
builder under ``deepspeed.zero.Init`` (:mod:`.build`), the cache schema, the export (:mod:`.export`) and
the memory inventory (:mod:`.memory`). The combine rule is declared as data (``dual_time_rule``) and runs
eager or, with ``kernels: triton``, in the fused kernel. There is no single-embedder mode:
the reference's Z-Image always has two.

Only the light pieces are re-exported here; the other modules import diffusers/transformers.
"""
from . import spec as _spec  # noqa: F401  (registers the family)
from .condition import ZImageCondition

__all__ = ["ZImageCondition"]
