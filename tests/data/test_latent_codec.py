"""The latent codec named by a cache fingerprint and an export record."""
import pytest
import torch

from twinflow.data.latent_codec import VAE, LatentCodec, pixel_fold_name


def test_pixel_fold_is_exact_and_shapes_follow_the_factor():
    codec = LatentCodec.parse(pixel_fold_name(4))
    pixels = torch.rand(2, 3, 32, 16) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 48, 8, 4) and codec.latent_shape(32, 16) == (48, 8, 4)
    assert torch.equal(codec.decoder()(latents), pixels)
    assert codec.size_multiple() == 8


def test_vae_is_the_default_and_asks_the_conditioner():
    class Conditioner:
        vae_scale_factor, latent_channels = 8, 16

        def latents_to_pixels(self, latents):
            return latents

    for name in (None, VAE):
        codec = LatentCodec.parse(name)
        assert codec.fold is None
    assert LatentCodec.from_fingerprint({}).name == VAE
    c = Conditioner()
    assert LatentCodec.parse(None).latent_shape(512, 256, c) == (16, 64, 32)
    assert LatentCodec.parse(None).decoder(c) == c.latents_to_pixels
    with pytest.raises(ValueError, match="conditioner"):
        LatentCodec.parse(None).encode(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("name", ["pixel_unshuffle_0", "pixel_unshuffle_x", "jpeg", ""])
def test_unknown_codec_names_are_refused_by_name(name):
    with pytest.raises(ValueError, match="unknown latent codec"):
        LatentCodec.parse(name)
