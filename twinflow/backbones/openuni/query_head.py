"""OpenUni's query head: the learnable queries, the connector and the projector.

The queries (256 vectors of the LLM's width) are appended to the prompt and read back from the frozen
LLM's last hidden states; the connector (a small bidirectional encoder) and a linear projector turn
those states into SANA's caption embeddings (the reference's ``proj_type="enc_proj"``:
``projector(connector(states))``, connector width = LLM width).

The reference's connector (``ConnectorEncoder`` in its ``networks/openuni/connector``) is a SigLIP-style
encoder: pre-LayerNorm layers with biased q/k/v/out projections, no mask, no positions, and a
``gelu_pytorch_tanh`` MLP (``fc1``/``fc2``), with no final norm. transformers' ``SiglipEncoder`` is the
same computation with the same parameter names (``layers.{i}.self_attn.q_proj`` ..., ``layer_norm1``,
``mlp.fc1``), so the checkpoint's ``connector.*`` keys load without renaming. (The reference also ships
a Qwen2-layer connector, ``Qwen2Connector``, that none of its configs uses.)
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from twinflow.utils.partitioned import gathered

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
"""diffusers' weights file name, so that the trainer's streaming loader (``load_checkpoint_into``) reads
the head as it reads a transformer folder."""
LEGACY_WEIGHTS_NAME = "model.safetensors"
"""The name earlier versions wrote; still read."""


@dataclass
class ConnectorConfig:
    """The connector's shape (the reference's ``ConnectorConfig`` fields). ``attn_implementation`` is
    transformers' attention backend ("sdpa" or "eager"; the reference uses flash-attention 2, the same
    computation)."""

    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 6
    num_attention_heads: int = 24
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attn_implementation: str = "sdpa"

    def to_transformers(self) -> SiglipVisionConfig:
        config = SiglipVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            attention_dropout=0.0,
        )
        config._attn_implementation = self.attn_implementation
        return config


@dataclass
class QueryHeadConfig:
    """Everything that shapes :class:`OpenUniQueryHead`; the defaults are OpenUni-L (InternVL3-2B, whose
    LLM is 1536 wide, into SANA-1.6B, whose caption width is 2304)."""

    num_queries: int = 256
    llm_hidden_size: int = 1536
    caption_channels: int = 2304
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)

    def __post_init__(self) -> None:
        if isinstance(self.connector, dict):
            self.connector = ConnectorConfig(**self.connector)
        if self.connector.hidden_size != self.llm_hidden_size:
            raise ValueError(
                f"connector.hidden_size {self.connector.hidden_size} must equal llm_hidden_size "
                f"{self.llm_hidden_size} (the connector reads the LLM's states before the projector)"
            )


class OpenUniQueryHead(nn.Module):
    """``meta_queries`` (Q, D_llm), ``connector`` and ``projector`` (D_llm -> caption_channels).

    ``forward(states)`` maps the LLM's query states (B, Q, D_llm) to SANA's caption input (B, Q, D_cap).
    Parameter names are the reference checkpoint's (``meta_queries``, ``connector.*``, ``projector.*``).
    """

    def __init__(self, config: QueryHeadConfig):
        super().__init__()
        self.config = config
        width = config.llm_hidden_size
        self.meta_queries = nn.Parameter(torch.empty(config.num_queries, width))
        self.connector = SiglipEncoder(config.connector.to_transformers())
        self.projector = nn.Linear(width, config.caption_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Queries normal(0, 1/sqrt(D_llm)) as the reference; the connector's linear weights Xavier-uniform
        with zero biases (the reference's scheme, except that its MLP biases start at normal(0, 1e-6)).
        A pretrained head overwrites all of it."""
        # Under deepspeed.zero.Init the connector's layers are partitioned already: gather them to write.
        with gathered(list(self.connector.parameters()), modify=True), torch.no_grad():
            self.meta_queries.normal_(0.0, 1.0 / math.sqrt(self.config.llm_hidden_size))
            for module in self.connector.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)

    def forward(self, states: torch.Tensor | None = None, *, prompt_embeds: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None, llm: nn.Module | None = None) -> torch.Tensor:
        """SANA's caption input (B, Q, caption_channels), from either

        * ``states``: the LLM's query states (B, Q, D_llm), already computed; or
        * ``prompt_embeds`` (B, L, D_llm), ``prompt_mask`` (B, L) and the frozen ``llm``: the queries are
          appended to the prompt and the LLM runs here (:func:`llm_query_states`).

        Both go through ``forward`` because ZeRO-3 gathers ``meta_queries`` only inside this module's
        forward (its pre-forward hook); the connector and projector gather in their own.
        """
        if (states is None) == (prompt_embeds is None):
            raise ValueError("OpenUniQueryHead takes either states or prompt_embeds (with prompt_mask and llm)")
        if states is None:
            if prompt_mask is None or llm is None:
                raise ValueError("prompt_embeds need prompt_mask and the llm")
            states = llm_query_states(llm, prompt_embeds, prompt_mask, self.meta_queries)
        return self.projector(self.connector(states.to(self.projector.weight.dtype)).last_hidden_state)

    def save_pretrained(self, folder: str | Path) -> Path:
        """``config.json`` and ``model.safetensors`` under ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None) -> "OpenUniQueryHead":
        """The head saved by :meth:`save_pretrained`, in ``dtype`` (default: the stored one); strict:
        every key present, none extra."""
        folder = Path(folder)
        weights = folder / WEIGHTS_NAME
        state = load_file(str(weights if weights.is_file() else folder / LEGACY_WEIGHTS_NAME))
        head = cls(QueryHeadConfig(**json.loads((folder / CONFIG_NAME).read_text())))
        head.to(dtype or next(iter(state.values())).dtype)
        head.load_state_dict(state, strict=True)
        return head


def llm_query_states(llm: nn.Module, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                     queries: torch.Tensor) -> torch.Tensor:
    """The frozen LLM's last hidden states at the queries (B, Q, D_llm), as the reference computes them.

    ``prompt_embeds`` (B, L, D) are the right-padded prompt tokens' input embeddings and ``prompt_mask``
    (B, L) marks the valid ones; the queries (Q, D) are appended after the padding. The attention mask
    covers the valid tokens and every query, and position ids count valid tokens only, so a query sees the
    same context at the same positions whatever the padding. The LLM (a transformers decoder: causal
    attention) runs once; gradients flow into the queries when they require grad.
    """
    batch = prompt_embeds.shape[0]
    expanded = queries.to(prompt_embeds.dtype)[None].expand(batch, -1, -1)
    mask = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(batch, queries.shape[0], dtype=torch.bool)], 1)
    positions = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
    hidden = llm(inputs_embeds=torch.cat([prompt_embeds, expanded], dim=1), attention_mask=mask,
                 position_ids=positions, use_cache=False).last_hidden_state
    return hidden[:, -queries.shape[0]:]
