"""Pieces shared by the text-to-image backbones with a KL VAE (SD3.5 and Z-Image).

* :class:`KLLatentCodec`: pixels <-> latents through diffusers' ``AutoencoderKL``. Both pipelines
  normalise latents with the VAE config's ``shift_factor`` and ``scaling_factor``:
  ``z = (mean - shift) * scale`` to encode (the posterior mean, as the reference TwinFlow code encodes
  training images) and ``(z / scale) + shift`` before decoding, exactly as ``StableDiffusion3Pipeline``
  and ``ZImagePipeline`` do. Only the factors differ (SD3.5: 1.5305 / 0.0609, Z-Image's Flux VAE:
  0.3611 / 0.1159), and they come from the loaded config.
* :class:`EncoderConfig` and :class:`TextToImageConditioner`: the part of a backbone's conditioning
  that does not depend on its text encoders (the negative-prompt condition, encoded once; the codec).
* :class:`LatentBackbone`: the input checks of an ``F(x_t, t, tt, cond)`` adapter on (B, C, H, W) latents.
* :func:`build_tiny_autoencoder_kl` and :func:`save_folder`: the tiny 16-channel VAE of both backbones'
  test folders, and the writer of those folders.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

DTypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KLLatentCodec:
    """Pixels (B, 3, H, W) in [-1, 1] <-> normalised latents (B, C, H/f, W/f) through a frozen VAE.

    ``patch_size`` is the transformer's patch size: images must tile into whole latent patches.
    """

    def __init__(self, vae: AutoencoderKL, device: torch.device, patch_size: int = 2) -> None:
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.device = device
        self.patch_size = patch_size
        config = self.vae.config
        self.shift = float(config.shift_factor or 0.0)
        self.scale = float(config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scale_factor(self) -> int:
        """Spatial compression (8 for the real VAEs): one downsampling per block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> ``(posterior mean - shift) * scale``, in the VAE's dtype."""
        tile = self.scale_factor * self.patch_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2] % tile or images.shape[-1] % tile:
            raise ValueError(
                f"images must be (B, 3, H, W) in [-1, 1] with H and W multiples of {tile} (VAE factor x patch "
                f"size), got shape {tuple(images.shape)}"
            )
        mean = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.mean
        return (mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, f h, f w), nominally in [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}")
        z = latents.to(self.device, self.vae.dtype) / self.scale + self.shift
        return self.vae.decode(z, return_dict=False)[0]


@dataclass
class EncoderConfig:
    """Where a backbone's conditioning models live and how prompts are encoded (config section
    ``encoder``). Each backbone subclasses it with its own defaults and sequence-length limit."""

    MAX_SEQUENCE_LENGTH: ClassVar[int | None] = None

    model_path: str
    max_sequence_length: int = 512
    negative_prompt: str = ""
    text_encoder_dtype: DTypeName = "bfloat16"
    vae_dtype: DTypeName = "bfloat16"

    def __post_init__(self) -> None:
        check_sequence_length(self.max_sequence_length, self.MAX_SEQUENCE_LENGTH)


def check_sequence_length(length: int, limit: int | None) -> None:
    if length < 1 or (limit is not None and length > limit):
        allowed = "at least 1" if limit is None else f"in [1, {limit}]"
        raise ValueError(f"max_sequence_length must be {allowed}, got {length}")


class TextToImageConditioner:
    """Frozen text encoders and a KL VAE: prompts -> condition, pixels <-> latents.

    Subclasses implement :meth:`encode_prompts` (returning a condition with ``cat``) and
    :meth:`load_components`, and name their hub folders, family and config class. The unconditional
    condition is ``negative_prompt`` encoded once and repeated: both pipelines pad every prompt to a
    fixed length, so a prompt's encoding does not depend on its batch.
    """

    FOLDERS: ClassVar[tuple[str, ...]]
    FAMILY: ClassVar[str]
    CONFIG: ClassVar[type[EncoderConfig]]

    def __init__(self, vae: AutoencoderKL, negative_prompt: str, device: torch.device | str, patch_size: int = 2):
        self.device = torch.device(device)
        self.codec = KLLatentCodec(vae, self.device, patch_size)
        self.vae = self.codec.vae
        self.negative_prompt = negative_prompt
        self._uncond: Any = None

    @classmethod
    def from_pretrained(cls, model_path: str | Path, device: torch.device | str = "cpu", **settings: Any) -> Any:
        """Load from a local folder in the hub layout, offline; ``settings`` are the config's fields."""
        return cls.from_config(cls.CONFIG(model_path=str(model_path), **settings), device)

    @classmethod
    def from_config(cls, config: EncoderConfig, device: torch.device | str = "cpu") -> Any:
        root = Path(config.model_path)
        require_folders(root, cls.FOLDERS, cls.FAMILY)
        text_encoders, tokenizers, vae = cls.load_components(
            root, DTYPES[config.text_encoder_dtype], DTYPES[config.vae_dtype]
        )
        return cls(
            text_encoders,
            tokenizers,
            vae,
            max_sequence_length=config.max_sequence_length,
            negative_prompt=config.negative_prompt,
            device=device,
        )

    @classmethod
    def load_components(cls, root: Path, text_dtype: torch.dtype, vae_dtype: torch.dtype) -> tuple[Any, Any, AutoencoderKL]:
        """(text encoder(s), tokenizer(s), VAE) from ``root``, offline (``local_files_only``)."""
        raise NotImplementedError

    def encode_prompts(self, texts: Sequence[str]) -> Any:
        raise NotImplementedError

    @torch.no_grad()
    def encode_unconditional(self, batch_size: int, ref_images: Tensor | None = None) -> Any:
        """The negative-prompt condition for ``batch_size`` rows (``ref_images``: the seam's conditioner
        signature; text-to-image takes none)."""
        _no_reference(ref_images)
        if self._uncond is None:
            self._uncond = self.encode_prompts([self.negative_prompt])
        return type(self._uncond).cat([self._uncond] * batch_size)

    @torch.no_grad()
    def encode_pair(self, texts: Sequence[str], ref_images: Tensor | None = None) -> tuple[Any, Any]:
        """(condition, unconditional condition) for a batch of prompts."""
        _no_reference(ref_images)
        return self.encode_prompts(texts), self.encode_unconditional(len(texts))

    def drop_text_encoder(self) -> None:
        """Free the text encoders (sampling keeps only the VAE; prompts are encoded before this)."""
        for name, value in list(vars(self).items()):
            if isinstance(value, nn.Module) and value is not self.vae:
                setattr(self, name, None)

    @property
    def latent_channels(self) -> int:
        return self.codec.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.codec.scale_factor

    def pixels_to_latents(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8), in the VAE's dtype."""
        return self.codec.encode(images)

    def latents_to_pixels(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1]."""
        return self.codec.decode(latents)


def _no_reference(ref_images: Tensor | None) -> None:
    if ref_images is not None:
        raise ValueError("a text-to-image conditioner takes no reference images")


def require_folders(root: Path, names: Sequence[str], family: str) -> None:
    """Fail naming every missing component folder of a hub-layout model folder."""
    missing = [name for name in names if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {root} lacks {missing} (expected the {family} hub layout: {list(names)})")


class LatentBackbone(nn.Module):
    """Base of the ``F(x_t, t, tt, cond)`` adapters on (B, C, H, W) latents: gradient checkpointing and
    the checks every such adapter makes. Subclasses set ``latent_channels``, ``patch_size`` and
    ``condition_type`` and check their condition's widths in :meth:`check_condition`."""

    condition_type: ClassVar[type]
    latent_channels: int
    patch_size: int

    def __init__(self, transformer: nn.Module, *, dtype: torch.dtype):
        super().__init__()
        self.transformer = transformer
        self.dtype = dtype

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def check_condition(self, cond: Any) -> None:
        """Widths of ``cond`` against the transformer's config (type and batch are checked already)."""

    def check_inputs(self, x_t: Tensor, t: Tensor, tt: Tensor, cond: Any) -> None:
        batch, channels = x_t.shape[:2] if x_t.dim() == 4 else (None, None)
        if channels != self.latent_channels:
            raise ValueError(f"x_t must be (B, {self.latent_channels}, H, W), got shape {tuple(x_t.shape)}")
        if x_t.shape[2] % self.patch_size or x_t.shape[3] % self.patch_size:
            raise ValueError(
                f"x_t spatial size {tuple(x_t.shape[2:])} must be divisible by the patch size {self.patch_size}"
            )
        if t.shape != (batch,) or tt.shape != (batch,):
            raise ValueError(f"t and tt must have shape (B,) = ({batch},), got {tuple(t.shape)} and {tuple(tt.shape)}")
        if not isinstance(cond, self.condition_type):
            raise TypeError(f"cond must be a {self.condition_type.__name__}, got {type(cond).__name__}")
        if len(cond) != batch:
            raise ValueError(f"cond batch {len(cond)} != x_t batch {batch}")
        self.check_condition(cond)


def build_tiny_autoencoder_kl(
    *, scaling_factor: float, shift_factor: float, channels: int = 16, seed: int = 0
) -> AutoencoderKL:
    """A tiny ``AutoencoderKL`` with ``channels`` latent channels, the real 8x spatial compression (four
    blocks) and the given factors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=channels,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return vae.eval()


def save_folder(path: str | Path, components: dict[str, Any]) -> Path:
    """``save_pretrained`` each component into ``path/<name>`` (the hub layout); returns ``path``."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for name, component in components.items():
        component.save_pretrained(root / name)
    return root
