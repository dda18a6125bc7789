"""OpenUni backbone: frozen InternVL3-2B + 256 learnable queries + connector + projector -> SANA-1.6B,
on DC-AE f32c32 latents (issue 15).

What this folder provides, by item of the backbone-seam note (``/work/shared/DESIGN.md``):

1. config: ``config.OpenUniBackboneConfig`` (``model.family: openuni``; ``train_query_head``, ``twin_embedder``,
   ``lora``); ``spec.OpenUniSpec`` registers the family.
2. build: ``build.build_openuni_backbone``: SANA (``transformer.TwinFlowSanaTransformer``, ``time_embed_2``) and
   the query head, streamed into ZeRO-3 partitions; the frozen InternVL3 language model loaded outside
   ``zero.Init``, whole on every rank. ``backbone.OpenUniBackbone`` is ``F(x_t, t, tt, prompt tokens)``; the
   trained and exported network is ``backbone.OpenUniGenerator`` (SANA + head).
3. dual-time rule: ``out_1(1000 t) + out_2(1000 tt) * (t - tt)`` on both AdaLayerNormSingle outputs
   (modulation and embedded timestep); E2 initialised normal(0, 0.02) with zero biases; the kernel's ``SANA``.
4. conditioning: ``condition.OpenUniPrompt`` (token ids: the LLM runs inside the backbone because the queries
   train), ``encoders.OpenUniPromptConditioner`` (the reference's template, the negative prompt
   ``Generate an image.``); ``encoders.OpenUniConditioner`` computes the reference's projected states
   directly (``condition.OpenUniCondition``), used to check the backbone against the reference's encoding.
5. latent codec: the DC-AE (``encoders.DCAELatents``: scaling factor applied).
6. cache schema: ``spec.OpenUniCacheSchema`` (token ids ragged; no LLM states).
7. LoRA: ``lora.SANA_LORA_TARGETS`` on SANA (the head stays frozen), with the EMA adapter.
8. memory: ``memory.memory_inventory`` (SANA + head trained, the LLM resident and frozen).
9. load and export: ``reference_checkpoint`` (the reference ``.pth`` with ``weights_only=True``) and
   ``convert`` (one-time conversion to an OpenUni folder); ``export`` writes ``transformer/``, ``query_head/``.
10. tiny local builds: ``tiny.py`` (configs), ``tiny_encoders.py`` (InternVL3 with tokenizer, head, DC-AE,
    SANA; ``save_tiny_model_folder``).

Only the light pieces are re-exported; the others import diffusers/transformers from their modules.
"""
from .condition import OpenUniCondition, OpenUniPrompt

__all__ = ["OpenUniCondition", "OpenUniPrompt"]
