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

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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
        with torch.no_grad():
            self.meta_queries.normal_(0.0, 1.0 / math.sqrt(self.config.llm_hidden_size))
            for module in self.connector.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.projector(self.connector(states).last_hidden_state)

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
        state = load_file(str(folder / WEIGHTS_NAME))
        head = cls(QueryHeadConfig(**json.loads((folder / CONFIG_NAME).read_text())))
        head.to(dtype or next(iter(state.values())).dtype)
        head.load_state_dict(state, strict=True)
        return head
