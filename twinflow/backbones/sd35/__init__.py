"""Stable Diffusion 3.5 (Medium) backbone.

What it provides, numbered as the items of "What a backbone provides" in the backbone-seam design
note:

2. build: :class:`~.transformer.TwinFlowSD3Transformer` (diffusers' ``SD3Transformer2DModel`` plus
   ``time_text_embed_2``; ``from_pretrained`` of a plain or a TwinFlow folder) and
   :class:`~.backbone.SD3Backbone`, the callable ``F(x_t, t, tt, cond)`` with signed times;
3. its dual-time rule (in :mod:`.transformer`): second embedder input ``tt``, coefficient
   ``(t - tt)`` (written ``(1000t - 1000tt) / 1000``), time scale 1000, extra input the pooled text;
   single-embedder mode ``E1(t - tt/2)``;
4. conditioning: :class:`~.condition.SD3Condition` (``index`` / ``cat``) and
   :class:`~.encoders.SD3Conditioner` (CLIP-L, CLIP-G, T5; negative prompt ``"Generate an image."``);
5. latent codec: the 16-channel ``AutoencoderKL`` (``twinflow.backbones.text_to_image``);
7. LoRA: :data:`~.lora.LORA_TARGET_MODULES` (the reference's list);
9. export and load: diffusers' folder layout, E2 under ``time_text_embed_2.*``;
10. tiny local builds: :mod:`.tiny` (transformer config), :mod:`.tiny_encoders` (three text encoders with
    locally trained tokenizers, VAE).

Wired through the seam by :mod:`.spec` (``model.family: sd35``): 1, the ``model`` section
(:mod:`.config`); the builder under ``deepspeed.zero.Init`` with streamed checkpoint loading
(:mod:`.build`); 3 as data (``dual_time_rule``; ``kernels: triton`` runs it in the fused
kernel); 6, the cache schema (``embeds``, ``pooled``, ``mask``); 7, LoRA with
the EMA adapter (Qwen-Image's injection); 8, the memory inventory (:mod:`.memory`).

Only the light pieces are imported here (the spec registers the family); the other modules import
diffusers/transformers.
"""
from . import spec as _spec  # noqa: F401  (registers the family)
from .condition import SD3Condition

__all__ = ["SD3Condition"]
