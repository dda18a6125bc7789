"""The TwinFlow backbone protocol ``F(x_t, t, tt, cond) -> velocity`` for OpenUni.

``cond`` is an :class:`~.condition.OpenUniPrompt` (the formatted prompts' token ids). One call runs

1. the frozen InternVL3 language model over the prompt followed by the learnable queries, inside the query
   head's forward (:class:`~.query_head.OpenUniQueryHead`), then its connector and projector: SANA's
   caption input (B, Q, caption_channels);
2. SANA (:class:`~.transformer.TwinFlowSanaTransformer`) on the latents, with ``t`` and ``tt`` (signed, in
   [-1, 1]) multiplied by 1000, as the reference's ``GenTransformer`` does.

What is trained, averaged into the EMA, checkpointed and exported is :class:`OpenUniGenerator` (SANA and
the query head), held as ``.transformer`` like every backbone's exported network. The language model is
frozen and kept outside the module tree (:attr:`OpenUniBackbone.llm`): DeepSpeed never sees it, so it is
neither partitioned (no all-gather of 2B weights on every forward) nor part of the optimizer, the EMA or a
checkpoint; every rank holds it whole, in the compute dtype, on its device.

Rows that repeat (the guidance pass joins the batch with copies of the negative prompt) run the LLM once:
distinct prompts are found with :meth:`~.condition.OpenUniPrompt.unique_rows` (one host sync).

Shapes and widths come from configs, never from parameters, so the adapter also works when ZeRO-3 has
partitioned the parameters.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from .condition import OpenUniPrompt
from .query_head import OpenUniQueryHead
from .transformer import TIME_SCALE


class OpenUniGenerator(nn.Module):
    """SANA (``sana``) and the query head (``query_head``): OpenUni's trained (and exported) network.

    ``config`` is ``{"sana": SANA's config, "query_head": the head's}``, as an export's layout records it.
    """

    def __init__(self, sana: nn.Module, query_head: OpenUniQueryHead):
        super().__init__()
        self.sana = sana
        self.query_head = query_head

    @property
    def config(self) -> dict[str, Any]:
        return {"sana": dict(self.sana.config), "query_head": dataclasses.asdict(self.query_head.config)}

    @property
    def peft_config(self) -> Any:
        """SANA's peft adapters (LoRA runs adapt SANA only)."""
        config = getattr(self.sana, "peft_config", None)
        if config is None:
            raise AttributeError("peft_config")
        return config


class OpenUniBackbone(nn.Module):
    """``F(x_t, t, tt, OpenUniPrompt)`` over an :class:`OpenUniGenerator` and the frozen language model
    ``llm`` (a transformers decoder taking ``inputs_embeds``: InternVL's ``model.language_model``).

    Inputs are cast to ``dtype`` (the compute dtype); the velocity is returned in ``x_t``'s dtype.
    """

    def __init__(self, generator: OpenUniGenerator, llm: nn.Module, *, dtype: torch.dtype):
        super().__init__()
        self.transformer = generator
        # A tuple keeps the LLM out of the module tree (see the module docstring).
        self._frozen = (llm.eval().requires_grad_(False),)
        self._llm_checkpointing = False
        self.dtype = dtype
        config = generator.sana.config
        self.latent_channels = int(config.in_channels)
        self.patch_size = int(config.patch_size)
        head = generator.query_head.config
        if int(config.out_channels or config.in_channels) != self.latent_channels:
            raise ValueError(
                f"transformer config: out_channels={config.out_channels} must equal in_channels={config.in_channels} "
                "for a velocity on the input latents"
            )
        if head.caption_channels != int(config.caption_channels):
            raise ValueError(f"query head projects to {head.caption_channels}, SANA's caption_channels is "
                             f"{config.caption_channels}")
        llm_width = int(llm.config.hidden_size)
        if head.llm_hidden_size != llm_width:
            raise ValueError(f"query head expects LLM width {head.llm_hidden_size}, the language model has {llm_width}")

    @property
    def llm(self) -> nn.Module:
        return self._frozen[0]

    def __deepcopy__(self, memo: dict) -> "OpenUniBackbone":
        """A copy (a dense teacher's) shares the frozen LLM instead of copying 1.5B weights."""
        memo[id(self._frozen)] = self._frozen
        return copy._reconstruct(self, memo, *self.__reduce_ex__(4))

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """SANA's blocks and, when the queries train (gradients pass through it), the LLM's layers."""
        sana = self.transformer.sana
        llm_too = enabled and any(p.requires_grad for p in self.transformer.query_head.parameters())
        if enabled:
            sana.enable_gradient_checkpointing()
        else:
            sana.disable_gradient_checkpointing()
        if llm_too:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.llm.train()  # transformers checkpoints in training mode only; the frozen LLM runs no dropout
        elif self._llm_checkpointing:
            self.llm.gradient_checkpointing_disable()
            self.llm.eval()
        self._llm_checkpointing = llm_too

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: OpenUniPrompt) -> None:
        if x_t.dim() != 4 or x_t.shape[1] != self.latent_channels:
            raise ValueError(f"x_t must be (B, {self.latent_channels}, H, W), got shape {tuple(x_t.shape)}")
        if x_t.shape[2] % self.patch_size or x_t.shape[3] % self.patch_size:
            raise ValueError(f"x_t spatial size {tuple(x_t.shape[2:])} must be divisible by {self.patch_size}")
        batch = x_t.shape[0]
        if t.shape != (batch,) or tt.shape != (batch,):
            raise ValueError(f"t and tt must have shape (B,) = ({batch},), got {tuple(t.shape)} and {tuple(tt.shape)}")
        if not isinstance(cond, OpenUniPrompt) or len(cond) != batch:
            raise TypeError(f"cond must be an OpenUniPrompt of {batch} rows, got {cond!r:.80}")

    def caption_states(self, cond: OpenUniPrompt) -> torch.Tensor:
        """SANA's caption input for ``cond`` (B, Q, caption_channels): the LLM with the queries, then the
        connector and projector, once per distinct prompt."""
        distinct, inverse = cond.unique_rows()
        embeds = self.llm.get_input_embeddings()(distinct.input_ids).to(self.dtype)
        states = self.transformer.query_head(prompt_embeds=embeds, prompt_mask=distinct.mask, llm=self.llm)
        return states[inverse]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: OpenUniPrompt) -> torch.Tensor:
        self._check_inputs(x_t, t, tt, cond)
        out = self.transformer.sana(
            hidden_states=x_t.to(self.dtype),
            encoder_hidden_states=self.caption_states(cond).to(self.dtype),
            timestep=t.float() * TIME_SCALE,
            target_timestep=tt.float() * TIME_SCALE,
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)
