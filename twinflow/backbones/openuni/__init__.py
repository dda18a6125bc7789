"""OpenUni backbone: frozen InternVL3-2B + 256 learnable queries + connector + projector -> SANA-1.6B,
on DC-AE f32c32 latents (issue 15).

What this folder provides, by item of the backbone-seam note (``/work/shared/DESIGN.md``):

2. build pieces: ``transformer.TwinFlowSanaTransformer`` (SANA with ``time_embed_2``; ``from_pretrained``
   fills ``time_embed_2`` on plain SANA checkpoints) and ``backbone.OpenUniBackbone``, the TwinFlow
   callable ``F(x_t, t, tt, cond)`` with signed times (x1000 for SANA), optionally owning the query head.
3. dual-time rule: ``out_1(1000 t) + out_2(1000 tt) * (t - tt)`` on both AdaLayerNormSingle outputs
   (modulation and embedded timestep); E2 initialised normal(0, 0.02) with zero biases; eager only.
4. conditioning: ``condition.OpenUniCondition`` (index / cat); ``query_head.OpenUniQueryHead`` (queries,
   SigLIP-style connector as the reference's, projector); ``encoders.OpenUniConditioner`` (prompts ->
   conditions through the frozen InternVL3 LLM, with gradient into the head; the negative prompt
   ``Generate an image.``).
5. latent codec: ``OpenUniConditioner.pixels_to_latents`` / ``latents_to_pixels`` (DC-AE, scaling factor).
7. LoRA: ``lora.SANA_LORA_TARGETS`` (and ``TIME_EMBED_2_LINEARS``).
9. load: ``reference_checkpoint`` reads the reference ``.pth`` with ``weights_only=True``, maps its keys
   onto the transformer and the query head, and converts it once to safetensors folders.
10. tiny local builds: ``tiny.py`` (configs), ``tiny_encoders.py`` (InternVL3 with tokenizer, head,
    DC-AE, SANA; ``save_tiny_model_folder``).

Still to be wired (not here yet): the config section and builder (incl. ZeRO-3 streaming load of
``transformer/``), registry entry, cache schema (DC-AE latents; the LLM query states only when the
queries are frozen), the image-free prompts-only data path, the four ``openuni_*`` configs, memory plan
rows (1.6B trained + 2B frozen), the EMA/LoRA teacher wiring, the fused SANA kernel rule, export.

Only the light pieces are re-exported; the others import diffusers/transformers from their modules.
"""
from .condition import OpenUniCondition

__all__ = ["OpenUniCondition"]
