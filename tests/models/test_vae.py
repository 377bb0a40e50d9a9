"""KL autoencoder: closed-form latent sampling, and parity with diffusers' PyTorch AutoencoderKL
loaded through both checkpoint namings (diffusers directory and CompVis/U-ViT ``.pth``)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.models.vae import (
    LOGVAR_RANGE,
    UVIT_SCALE_FACTOR,
    AutoencoderKL,
    VAEConfig,
    decode,
    encode_moments,
    sample_latent,
    split_moments,
)

# Three levels of distinct widths (catches a reversed decoder order), 4 norm groups, 3 latents.
TINY = {
    "block_out_channels": (8, 16, 24),
    "layers_per_block": 1,
    "latent_channels": 3,
    "norm_num_groups": 4,
}


def _random_params(module, *inputs):
    """Random weights of the right shapes (compiling ``init`` of a conv net is slow on CPU)."""
    template = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype), template)


def test_shapes_clamp_and_sampling_closed_form():
    config = VAEConfig(**TINY, scale_factor=0.5)
    module = AutoencoderKL(config)
    images = jax.random.uniform(jax.random.key(0), (2, 16, 12, 3), minval=-1, maxval=1)
    params = _random_params(module, images)
    assert params["encoder"]["down_0"]["block_0"]["norm1"]["scale"].shape == (8,)
    assert "nin_shortcut" in params["decoder"]["up_0"]["block_0"]  # 16 -> 8 channels

    moments = encode_moments(module, params, images)
    assert moments.shape == (2, 4, 3, 6) and moments.dtype == jnp.float32
    # A huge log-variance bias is clamped to the upper bound, as in the reference.
    bias = params["quant_conv"]["bias"].at[3:].set(1e4)
    clamped = encode_moments(
        module, {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}, images
    )
    np.testing.assert_allclose(split_moments(clamped)[1], LOGVAR_RANGE[1])

    rng = jax.random.key(2)
    mean, logvar = split_moments(moments)
    z = sample_latent(moments, rng, 0.5)
    eps = jax.random.normal(rng, mean.shape)
    np.testing.assert_allclose(z, 0.5 * (mean + jnp.exp(logvar / 2) * eps), rtol=1e-6, atol=1e-6)

    out = decode(module, params, z, 0.5)
    assert out.shape == (2, 16, 12, 3)
    np.testing.assert_allclose(out, decode(module, params, 2 * z, 1.0), atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        module.apply({"params": params}, images[:, :10], method=AutoencoderKL.encode_moments)


def test_bf16_compute_keeps_float32_outputs():
    module = AutoencoderKL(VAEConfig(**TINY), dtype=jnp.bfloat16)
    images = jnp.zeros((1, 8, 8, 3))
    params = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
    assert params["decoder"]["mid"]["attn_1"]["q"]["kernel"].shape == (24, 24)
    assert params["decoder"]["mid"]["attn_1"]["q"]["kernel"].dtype == jnp.float32
    moments = jax.eval_shape(encode_moments, module, params, images)
    images_out = jax.eval_shape(decode, module, params, jnp.zeros((1, 2, 2, 3)))
    assert moments.shape == (1, 2, 2, 6) and moments.dtype == jnp.float32
    assert images_out.shape == (1, 8, 8, 3) and images_out.dtype == jnp.float32


def _compvis_name(key: str, num_levels: int) -> str:
    """diffusers -> CompVis/U-ViT names, written independently of pdm_jax.weights.vae."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = key.replace("mid_block.attentions.0", "mid.attn_1")
    for old, new in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v")]:
        key = key.replace(f"attn_1.{old}.", f"attn_1.{new}.")
    key = key.replace("attn_1.to_out.0.", "attn_1.proj_out.")
    key = re.sub(r"down_blocks\.(\d)\.resnets\.(\d)", r"down.\1.block.\2", key)
    key = re.sub(r"down_blocks\.(\d)\.downsamplers\.0", r"down.\1.downsample", key)
    flip = lambda m: str(num_levels - 1 - int(m[1]))
    key = re.sub(r"up_blocks\.(\d)\.resnets\.", lambda m: f"up.{flip(m)}.block.", key)
    return re.sub(r"up_blocks\.(\d)\.upsamplers\.0", lambda m: f"up.{flip(m)}.upsample", key)


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL saved with save_pretrained."""
    pytest.importorskip("torch")
    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.manual_seed(0)
    n = len(TINY["block_out_channels"])
    vae = TorchAutoencoderKL(
        **TINY,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        scaling_factor=0.3,
    ).eval()
    with torch.no_grad():  # random (not zero-init) norms and biases everywhere
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("diffusers_vae")
    vae.save_pretrained(directory)
    return directory, vae


def _check_parity(module, params, vae, scale, pass_scale=True):
    import torch

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    latents = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        ref_moments = torch.cat([dist.mean, dist.logvar], dim=1).permute(0, 2, 3, 1).numpy()
        ref_images = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
        ref_images = ref_images.permute(0, 2, 3, 1).numpy()
    moments = np.asarray(encode_moments(module, params, images))
    # Without an explicit scale, decode uses module.config.scale_factor.
    decoded = np.asarray(decode(module, params, latents * scale, scale if pass_scale else None))
    assert np.abs(ref_moments).max() > 0.1 and np.abs(ref_images).max() > 0.1
    d_moments = np.abs(moments - ref_moments).max()
    d_images = np.abs(decoded - ref_images).max()
    assert d_moments <= 1e-4 and d_images <= 1e-4, (d_moments, d_images)


@pytest.mark.torch
def test_diffusers_directory_matches_torch(diffusers_vae):
    from pdm_jax.weights.vae import load_vae

    directory, vae = diffusers_vae
    module, params = load_vae(directory)
    assert module.config == VAEConfig(**TINY, scale_factor=0.3)
    _check_parity(module, params, vae, 0.3, pass_scale=False)


@pytest.mark.torch
def test_old_diffusers_attention_names(diffusers_vae, tmp_path):
    from pdm_jax.weights.torch_io import save_safetensors
    from pdm_jax.weights.vae import load_vae

    directory, vae = diffusers_vae
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in vae.state_dict().items():
        for new_name, old_name in old.items():
            key = key.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        state[key] = value.numpy()
    assert any(".query." in k for k in state) and not any(".to_q." in k for k in state)
    (tmp_path / "vae").mkdir()  # a pipeline root with a vae/ folder
    save_safetensors(state, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "vae" / "config.json").write_text((directory / "config.json").read_text())
    module, params = load_vae(tmp_path)
    _check_parity(module, params, vae, 0.3)


@pytest.mark.torch
def test_compvis_pth_matches_torch(diffusers_vae, tmp_path):
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from pdm_jax.weights.torch_io import ConversionError
    from pdm_jax.weights.vae import load_vae

    directory, vae = diffusers_vae
    n = len(TINY["block_out_channels"])
    reference = vae.state_dict()
    compvis = {}
    for key, value in reference.items():
        name = _compvis_name(key, n)
        if ".attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # CompVis attention projections are 1x1 convs
        compvis[name] = value.clone()
    # diffusers' own LDM -> diffusers converter must give back the original state dict.
    config = json.loads((directory / "config.json").read_text())
    back = convert_ldm_vae_checkpoint(dict(compvis), config)
    assert set(back) == set(reference)
    assert all(torch.equal(back[k], reference[k]) for k in reference)

    torch.save(compvis, tmp_path / "autoencoder_kl.pth")
    tiny = VAEConfig(**TINY, scale_factor=UVIT_SCALE_FACTOR)
    module, params = load_vae(tmp_path / "autoencoder_kl.pth", tiny)
    assert set(params["encoder"]) >= {"down_0", "down_2", "mid", "conv_in", "norm_out"}
    _check_parity(module, params, vae, UVIT_SCALE_FACTOR)

    # An SD-style checkpoint: prefixed keys plus loss weights that are skipped.
    sd = {f"first_stage_model.{k}": v for k, v in compvis.items()}
    sd["model.diffusion_model.x.weight"] = torch.zeros(1)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd}, tmp_path / "sd.ckpt")
    _, params_sd = load_vae(tmp_path / "sd.ckpt", tiny)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, params_sd))

    broken = dict(compvis)
    broken.pop("decoder.up.0.block.1.conv2.bias")
    broken["encoder.down.0.attn.0.q.weight"] = torch.zeros(8, 8, 1, 1)
    broken["quant_conv.weight"] = torch.zeros(6, 5, 1, 1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ConversionError) as err:
        load_vae(tmp_path / "broken.pth", tiny)
    message = str(err.value)
    assert "decoder/up_0/block_1/conv2/bias" in message
    assert "encoder.down.0.attn.0.q.weight" in message
    assert "quant_conv/kernel: checkpoint (1, 1, 5, 6) vs model (1, 1, 6, 6)" in message
    with pytest.raises(ConversionError, match="missing"):
        load_vae(tmp_path / "autoencoder_kl.pth")  # default = full SD architecture


@pytest.mark.torch
def test_convert_cli_writes_a_directory_load_vae_reads(diffusers_vae, tmp_path):
    from pdm_jax.convert.__main__ import convert
    from pdm_jax.weights.vae import load_vae

    directory, _ = diffusers_vae
    out = tmp_path / "vae_converted"
    convert(["vae", "--input", str(directory), "--output", str(out)])
    module, params = load_vae(directory)
    module2, params2 = load_vae(out)
    assert module2.config == module.config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(a, b)
