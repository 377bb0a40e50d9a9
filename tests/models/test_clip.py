"""CLIP towers, loaders and wrappers against transformers' PyTorch CLIP (tiny random configs)."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pdm_jax.models.clip import (
    ClipConfig,
    CLIPModel,
    ClipTextConfig,
    CLIPTextModel,
    ClipVisionConfig,
    eos_positions,
)
from pdm_jax.models.clip_embed import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

CAPTIONS = [
    "a photo of the cat",
    "",
    "THE   Cat!",
    " ".join(["the photo of a cat"] * 8),  # longer than max_length: truncated
]
MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>"]
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: the 256 base symbols of the BPE vocabulary."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _write_tokenizer(directory) -> int:
    """Writes a tiny CLIP BPE vocabulary (same layout as OpenAI's) and returns its size."""
    chars = _byte_alphabet()
    merged = ["".join(m.split()) for m in MERGES]
    vocab = [*chars, *(c + "</w>" for c in chars), *merged, "<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return len(vocab)


def test_eos_positions_legacy_and_new_rules():
    ids = jnp.array([[5, 9, 7, 7], [5, 3, 9, 9]])
    # Legacy (eos_token_id == 2): first largest id; otherwise the first eos occurrence.
    np.testing.assert_array_equal(eos_positions(ids, 2), [1, 2])
    np.testing.assert_array_equal(eos_positions(ids, 7), [2, 0])


def test_text_model_shapes_and_causality():
    cfg = ClipTextConfig(vocab_size=50, **TEXT)
    module = CLIPTextModel(cfg)
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
    template = jax.eval_shape(module.init, jax.random.key(1), ids)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype), template)
    apply = jax.jit(module.apply)
    hidden, pooled = apply({"params": params}, ids)
    assert hidden.shape == (2, 16, 32) and pooled.shape == (2, 32)
    # Causal mask: changing the last token leaves every earlier position unchanged.
    hidden2, _ = apply({"params": params}, ids.at[:, -1].set(3))
    np.testing.assert_allclose(hidden[:, :-1], hidden2[:, :-1], atol=1e-6)
    assert not np.allclose(hidden[:, -1], hidden2[:, -1])


def test_clip_model_bf16_compute():
    cfg = ClipConfig(
        ClipTextConfig(vocab_size=50, **TEXT), ClipVisionConfig(**VISION), projection_dim=16
    )
    module = CLIPModel(cfg, dtype=jnp.bfloat16)
    ids = jnp.ones((2, 16), jnp.int32)
    pixels = jnp.zeros((3, 32, 32, 3))
    params = jax.eval_shape(module.init, jax.random.key(0), ids, pixels)["params"]
    text, image, scale = jax.eval_shape(module.apply, {"params": params}, ids, pixels)
    assert text.shape == (2, 16) and image.shape == (3, 16) and scale.shape == ()
    assert text.dtype == jnp.bfloat16 and params["text_projection"]["kernel"].dtype == jnp.float32
    assert params["vision_model"]["embeddings"]["position_embedding"]["embedding"].shape == (17, 32)


def _normalise(x01):
    return (x01 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)


def test_preprocess_constant_image_is_normalised_colour():
    image = np.full((2, 45, 60, 3), (10, 128, 250), np.uint8)
    out = clip_preprocess(image, size=32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(
        out, np.broadcast_to(_normalise(image[0, 0, 0] / 255.0), out.shape), atol=1e-5
    )


def test_preprocess_centre_crop_uses_torchvision_rounding():
    """No resize when the short side is already 32; an odd margin of 11 columns starts at
    torchvision's ``int(round(5.5)) = 6`` (OpenAI's transform), not HF's floor (5)."""
    cols = np.arange(43, dtype=np.uint8)[None, :, None] * 5
    image = np.broadcast_to(cols, (32, 43, 3)).copy()
    out = clip_preprocess([image], size=32)[0]
    np.testing.assert_allclose(out, _normalise(image[:, 6:38] / 255.0), atol=1e-5)


def test_preprocess_resizes_shorter_side_with_pil_bicubic():
    image = np.random.default_rng(0).integers(0, 256, size=(64, 87, 3), dtype=np.uint8)
    # Shorter side 64 -> 32, longer side int(32 * 87 / 64) = 43, then crop columns 6..37.
    resized = np.asarray(Image.fromarray(image).resize((43, 32), Image.Resampling.BICUBIC))
    out = clip_preprocess(image[None], size=32)[0]
    np.testing.assert_allclose(out, _normalise(resized[:, 6:38] / 255.0), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(image[None].astype(np.float32), size=32)


def test_preprocess_matches_hf_pil_processor_when_crop_margins_are_even():
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = np.random.default_rng(1).integers(0, 256, size=(40, 52, 3), dtype=np.uint8)
    ref = proc(images=[Image.fromarray(image)], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(
        clip_preprocess(image[None], 32), ref.transpose(0, 2, 3, 1), atol=1e-5
    )


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A tiny random transformers ``CLIPModel`` plus tokenizer, saved with save_pretrained."""
    pytest.importorskip("torch")
    import torch
    from transformers import CLIPConfig
    from transformers import CLIPModel as TorchCLIPModel

    directory = tmp_path_factory.mktemp("hf_clip")
    vocab_size = _write_tokenizer(directory)
    text = dict(TEXT, vocab_size=vocab_size, bos_token_id=vocab_size - 2)
    text["eos_token_id"] = vocab_size - 1
    config = CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)
    torch.manual_seed(0)
    model = TorchCLIPModel(config).eval()
    model.save_pretrained(directory)
    return directory, model


def _torch_ids(tokenizer):
    import torch

    out = tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True)
    return torch.tensor(out["input_ids"])


@pytest.mark.torch
def test_tokenizer_is_the_local_one(hf_clip_dir):
    from transformers import CLIPTokenizer

    from pdm_jax.weights.clip import load_text_encoder

    directory, _ = hf_clip_dir
    encoder = load_text_encoder(directory)
    reference = CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt")
    )
    ids = encoder.tokenize(CAPTIONS)
    expected = reference(CAPTIONS, padding="max_length", max_length=16, truncation=True)
    np.testing.assert_array_equal(ids, np.array(expected["input_ids"]))
    bos, eos = encoder.tokenizer.bos_token_id, encoder.tokenizer.eos_token_id
    assert ids.shape == (4, 16) and (ids[:, 0] == bos).all()
    assert ids[1, 1] == eos and ids[3, 15] == eos  # empty caption; truncated caption ends in eos
    assert len(set(ids[0, 1:6].tolist())) == 5 and (ids[0, 1:6] < bos).all()


@pytest.mark.torch
@pytest.mark.parametrize("legacy_eos", [False, True])
def test_text_encoder_matches_transformers(hf_clip_dir, tmp_path, legacy_eos):
    import torch
    from transformers import CLIPTextModel as TorchCLIPTextModel

    from pdm_jax.weights.clip import load_clip_text, load_text_encoder

    directory, full = hf_clip_dir
    text_config = full.config.text_config
    if legacy_eos:  # an old-style config: pooling by argmax of the ids
        text_config = copy.deepcopy(text_config)
        text_config.eos_token_id = 2
    torch_text = TorchCLIPTextModel(text_config).eval()
    torch_text.load_state_dict(full.text_model.state_dict())
    torch_text.save_pretrained(tmp_path)  # transformers 5 writes keys without 'text_model.'
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())

    module, params, tokenizer = load_clip_text(tmp_path)
    assert module.config.eos_token_id == (2 if legacy_eos else text_config.eos_token_id)
    ids = _torch_ids(tokenizer)
    with torch.no_grad():
        ref = torch_text(input_ids=ids)
    hidden, pooled = module.apply({"params": params}, jnp.asarray(ids.numpy()))
    assert np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy()).max() <= 1e-5
    assert np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max() <= 1e-5

    encoder = load_text_encoder(tmp_path, batch_size=2)  # 4 captions: two batches of 2
    contexts = encoder.encode(CAPTIONS)
    assert contexts.shape == (4, 16, 32)
    assert np.abs(contexts - ref.last_hidden_state.numpy()).max() <= 1e-5
    np.testing.assert_allclose(encoder.empty_context(), contexts[1], atol=1e-6)


@pytest.mark.torch
def test_full_clip_embeddings_match_transformers(hf_clip_dir):
    import torch

    from pdm_jax.weights.clip import load_clip_embedder, load_clip_text

    directory, model = hf_clip_dir
    embedder = load_clip_embedder(directory, batch_size=4)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(40, 51, 3), (37, 50, 3)]]
    pixels = clip_preprocess(images, size=32)
    with torch.no_grad():
        ref_img = model.get_image_features(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)
        )
        ref_txt = model.get_text_features(input_ids=_torch_ids(embedder.tokenizer))
    ref_img = ref_img.pooler_output if hasattr(ref_img, "pooler_output") else ref_img
    ref_txt = ref_txt.pooler_output if hasattr(ref_txt, "pooler_output") else ref_txt
    ref_img = torch.nn.functional.normalize(ref_img, dim=-1).numpy()
    ref_txt = torch.nn.functional.normalize(ref_txt, dim=-1).numpy()

    image_embeds = embedder.image_embeds(images)
    text_embeds = embedder.text_embeds(CAPTIONS)
    assert image_embeds.shape == (2, 16) and text_embeds.shape == (4, 16)
    assert np.abs(image_embeds - ref_img).max() <= 1e-5
    assert np.abs(text_embeds - ref_txt).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(image_embeds, axis=-1), 1.0, atol=1e-6)
    # The text-only loader accepts a full CLIPModel directory (vision weights are skipped).
    module, params, _ = load_clip_text(directory)
    assert set(params) == {"text_model"} and module.config.hidden_size == 32


@pytest.mark.torch
def test_text_loader_reads_stable_diffusion_layout(hf_clip_dir, tmp_path):
    from pdm_jax.weights.clip import load_clip_text

    directory, _ = hf_clip_dir
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "text_encoder" / name).write_bytes((directory / name).read_bytes())
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / name).write_bytes((directory / name).read_bytes())
    module, params, tokenizer = load_clip_text(tmp_path)
    assert module.config.vocab_size == len(tokenizer)
    np.testing.assert_array_equal(
        params["text_model"]["final_layer_norm"]["scale"],
        load_clip_text(directory)[1]["text_model"]["final_layer_norm"]["scale"],
    )


@pytest.mark.torch
def test_loader_reads_pytorch_bin_and_reports_mismatches(hf_clip_dir, tmp_path):
    import torch

    from pdm_jax.weights.clip import load_clip
    from pdm_jax.weights.torch_io import ConversionError

    directory, model = hf_clip_dir
    for name in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    state = model.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    _, params, _ = load_clip(tmp_path)
    np.testing.assert_allclose(
        params["vision_model"]["embeddings"]["patch_embedding"]["kernel"],
        state["vision_model.embeddings.patch_embedding.weight"].numpy().transpose(2, 3, 1, 0),
    )
    state = dict(state)
    state.pop("text_model.final_layer_norm.bias")
    state["text_model.extra.weight"] = torch.zeros(3)
    state["visual_projection.weight"] = torch.zeros(16, 31)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConversionError) as err:
        load_clip(tmp_path)
    message = str(err.value)
    assert "text_model/final_layer_norm/bias" in message
    assert "text_model.extra.weight" in message
    assert "visual_projection/kernel: checkpoint (31, 16) vs model (32, 16)" in message


@pytest.mark.torch
def test_convert_cli_writes_a_directory_load_clip_text_reads(hf_clip_dir, tmp_path):
    from pdm_jax.convert.__main__ import convert
    from pdm_jax.models.clip_embed import tokenize
    from pdm_jax.weights.clip import load_clip_text

    directory, _ = hf_clip_dir
    out = tmp_path / "clip_converted"
    convert(["clip_text", "--input", str(directory), "--output", str(out)])
    module, params, tokenizer = load_clip_text(directory)
    module2, params2, tokenizer2 = load_clip_text(out)
    assert module2.config == module.config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(a, b)
    captions = ["a photo", ""]
    np.testing.assert_array_equal(
        tokenize(tokenizer, captions, 16), tokenize(tokenizer2, captions, 16)
    )


@pytest.mark.torch
def test_sd2_style_text_tower_matches_transformers(hf_clip_dir, tmp_path):
    """SD 2.x's text encoder: OpenCLIP ViT-H's tower in ``CLIPTextModel`` layout (exact
    GELU, 1024-d there; a tiny width here) loads through the same loader."""
    import torch
    from transformers import CLIPTextModel as TorchCLIPTextModel

    from pdm_jax.weights.clip import load_clip_text

    directory, full = hf_clip_dir
    text_config = copy.deepcopy(full.config.text_config)
    text_config.hidden_act = "gelu"
    torch.manual_seed(0)
    torch_text = TorchCLIPTextModel(text_config).eval()
    torch_text.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    module, params, tokenizer = load_clip_text(tmp_path)
    assert module.config.hidden_act == "gelu"
    ids = _torch_ids(tokenizer)
    with torch.no_grad():
        ref = torch_text(input_ids=ids).last_hidden_state.numpy()
    hidden, _ = module.apply({"params": params}, jnp.asarray(ids.numpy()))
    assert np.abs(np.asarray(hidden) - ref).max() <= 1e-5
