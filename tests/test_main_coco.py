"""Sample mode on a COCO config, end to end through ``python -m pdm_jax.main``.

Fixtures, all tiny and random, written the way users hold them: a Hugging Face CLIP text
directory (``config.json``, ``model.safetensors``, BPE tokenizer files) passed with
``--text_encoder``; a KL-f8 VAE in the ``python -m pdm_jax.convert vae`` layout passed with
``--vae``; the fake COCO tree of ``tests.data.fake_coco`` prepared by ``prepare_coco`` with
the same two networks; and a one-stream checkpoint at the COCO geometry (32×32×4 latents,
64×64 maps, 16×32 contexts; width 32, depth 2). The expected samples are recomputed in the
test from the networks' parameters directly (tokenizer → Flax CLIP → sampler → VAE
decoder), so they check that the PNGs are the VAE's decoding of the latent sampled with
the CLIP context of the raw prompt.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from configs import pdm as pdm_configs
from pdm_jax import models, specs
from pdm_jax.data import schema
from pdm_jax.data.coco import encoders as coco_encoders
from pdm_jax.data.coco import panoptic as coco
from pdm_jax.data.coco import prepare as prepare_coco
from pdm_jax.models.clip import ClipTextConfig, CLIPTextModel
from pdm_jax.models.vae import AutoencoderKL
from pdm_jax.sampling import mode as sample_mode
from pdm_jax.sampling.sampler import Sampler
from pdm_jax.weights import components
from pdm_jax.weights.torch_io import save_safetensors
from tests.data import fake_coco
from tests.train import saved_states

REPO = Path(__file__).resolve().parents[1]
SCALE = fake_coco.VAE_SCALE
PROMPT = "the sky over the sea"
OTHER_PROMPT = "a dog on the wooden floor"
SEED = 3
# A random denoiser's data predictions are far outside the latent range (|x̂_0| ≈ 15, which
# the VAE decodes to saturated colours); clipped, the PNGs keep the context's effect visible.
CLIP_X0 = 1.0
CFG_SCALE = 2.0  # guidance: the unconditional context (CLIP of "") is used too
TINY_VAE = fake_coco.TINY_VAE
TEXT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=16,
)
MODEL = dict(img_size=32, in_chans=4, clip_dim=32, num_clip_token=16)


def _random_params(module, *inputs, seed):
    """Random weights everywhere, norms and biases included (no ``init`` run)."""
    return _random_tree(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"], seed)


def _random_tree(shapes, seed):
    """Fan-in scaled normal weights; norm scales ≈ 1 and biases ≈ 0, perturbed."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.1 * noise
        if "bias" in name:
            return 0.1 * noise
        return noise / np.sqrt(max(1, int(np.prod(leaf.shape[:-1]))))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _write_hf_clip_text(directory: Path, params, vocab_size: int) -> None:
    """A transformers ``CLIPTextModel`` directory holding ``params`` (Hugging Face names)."""
    from transformers import CLIPTextConfig

    CLIPTextConfig(
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **TEXT,
    ).save_pretrained(directory)
    state = {}
    for path, value in traverse_util.flatten_dict(params).items():
        *parents, leaf = [p.replace("layers_", "layers.") for p in path]
        value = np.asarray(value)
        state[".".join([*parents, "bias" if leaf == "bias" else "weight"])] = (
            value.T if leaf == "kernel" else value
        )
    save_safetensors(state, directory / "model.safetensors")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Writes every fixture; returns paths, the config and the networks."""
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("coco_sampling")
    clip_dir, vae_dir, data_dir = root / "clip", root / "vae", root / "prepared"
    vocab_size = fake_coco.write_clip_tokenizer(str(clip_dir))
    text = CLIPTextModel(ClipTextConfig(vocab_size=vocab_size, eos_token_id=vocab_size - 1, **TEXT))
    text_params = _random_params(text, np.zeros((1, 16), np.int32), seed=1)
    _write_hf_clip_text(clip_dir, text_params, vocab_size)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)

    vae = AutoencoderKL(TINY_VAE)
    vae_params = _random_params(vae, np.zeros((1, 16, 16, 3), np.float32), seed=0)
    components.save_component(str(vae_dir), "vae", vae_params, TINY_VAE)

    # The fake tree is a val split; sample mode reads the prepared train split.
    tree = Path(fake_coco.make_fake_coco(str(root / "coco")))
    os.rename(tree / "val2017", tree / "train2017")
    for name in ("captions_{}2017.json", "panoptic_{}2017.json", "panoptic_{}2017"):
        os.rename(
            tree / "annotations" / name.format("val"), tree / "annotations" / name.format("train")
        )
    prepare_coco.prepare(
        str(tree),
        str(data_dir),
        "train",
        coco_encoders.VaeMoments(vae, vae_params, batch_size=2),
        coco_encoders.ClipContexts(text, text_params, tokenizer, batch_size=8),
        options=prepare_coco.PrepareOptions(records_per_shard=2),
        batch_size=2,
        show_progress=False,
    )

    config = pdm_configs.get_config("one_stream,tiny=1")
    config.model.update(**MODEL)
    config.data.update(source="coco", dir=str(data_dir), latent_scale=SCALE, num_workers=0)
    config.sampler.update(clip_x0=CLIP_X0, cfg_scale=CFG_SCALE)
    # Fan-in scaled random weights: unlike the official initialisation (std 0.02), they let
    # the context change the sample visibly.
    params = _random_tree(models.abstract_params(config.model), seed=2)
    workdir = root / "workdir"
    saved_states.save_state(workdir, saved_states.params_only_state(params, step=7), config)
    return dict(
        root=root,
        clip_dir=clip_dir,
        vae_dir=vae_dir,
        data_dir=data_dir,
        workdir=workdir,
        config=config,
        params=params,
        text=(text, text_params, tokenizer),
        vae=(vae, vae_params),
    )


@pytest.fixture(scope="module")
def expected(setup):
    """Samples of PROMPT and OTHER_PROMPT computed from the networks' own parameters.

    Tokenizer → Flax CLIP (no loader) gives the contexts; the sampler runs one example per
    call as sample mode does for one prompt; the VAE decoder, applied here, gives the
    uint8 images.

    Returns:
      ``(Samples, contexts [2, 16, 32], empty context [16, 32])``.
    """
    prompts = [PROMPT, OTHER_PROMPT]
    text, text_params, tokenizer = setup["text"]
    vae, vae_params = setup["vae"]
    ids = tokenizer(list(prompts), padding="max_length", max_length=16, truncation=True)
    contexts = np.asarray(
        text.apply({"params": text_params}, jnp.asarray(ids["input_ids"], jnp.int32))[0]
    )
    empty = np.asarray(
        text.apply(
            {"params": text_params},
            jnp.asarray(tokenizer([""], padding="max_length", max_length=16)["input_ids"]),
        )[0][0]
    )

    @jax.jit
    def decode_fn(latents):
        x = vae.apply({"params": vae_params}, latents / SCALE, method="decode")
        return jnp.clip((x + 1.0) * 127.5 + 0.5, 0, 255)

    decode = lambda latents: np.asarray(decode_fn(jnp.asarray(latents))).astype(np.uint8)

    lookup = dict(zip(prompts, contexts, strict=True))
    info = schema.DatasetInfo(
        empty_context=empty,
        encode_text=lambda captions: np.stack([lookup[c] for c in captions]),
        encode_images=None,
        decode_latents=decode,
        category_names=coco.category_names(),
        colour_table=coco.colour_table(),
        eval_prompts=(),
    )
    run = specs.from_config(setup["config"])
    sampler = Sampler(run.model, run.diffusion, run.sampler, info, setup["params"], batch_size=1)
    samples = sampler([SEED] * len(prompts), captions=list(prompts))
    return samples, contexts, empty


def _read_png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def _start_main(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pdm_jax.main", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    """``(return code, stderr)`` of a started ``pdm_jax.main``."""
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def _coco_args(setup, out_dir) -> list[str]:
    model = [f"--config.model.{k}={v}" for k, v in MODEL.items()]
    return [
        "--config=configs/pdm.py:one_stream,tiny=1",
        f"--workdir={setup['workdir']}",
        "--mode=sample",
        *model,
        f"--config.data.dir={setup['data_dir']}",
        f"--config.data.latent_scale={SCALE}",
        f"--config.sampler.clip_x0={CLIP_X0}",
        f"--config.sampler.cfg_scale={CFG_SCALE}",
        f"--config.sample.prompt={PROMPT}",
        f"--config.sample.seed={SEED}",
        f"--config.sample.out_dir={out_dir}",
    ]


def test_cli_decodes_coco_latents_with_the_vae_and_encodes_raw_prompts_with_clip(setup, expected):
    out = setup["root"] / "cli_samples"
    code, stderr = _finish(
        _start_main(
            *_coco_args(setup, out),
            f"--text_encoder={setup['clip_dir']}",
            f"--vae={setup['vae_dir']}",
        )
    )
    assert code == 0, stderr[-3000:]
    meta = json.loads((out / "samples.json").read_text())
    assert meta["step"] == 7 and meta["task"] == "cogenerate"
    (rec,) = meta["samples"]
    assert rec["caption"] == PROMPT and rec["seed"] == SEED

    image = _read_png(out / rec["image"])
    assert image.shape == (256, 256, 3)  # 32×32 latents through the f8 decoder
    assert image.std() > 5  # a decoded image, not a constant fill
    samples, contexts, empty = expected
    # The prepared data's unconditional context is the same CLIP's encoding of "".
    np.testing.assert_allclose(np.load(setup["data_dir"] / "empty_context.npy"), empty, atol=1e-5)
    assert contexts.shape == (2, 16, 32)
    # The PNG is the VAE's decoding of the latent sampled with CLIP(PROMPT): only rounding of
    # the last uint8 step may differ (the CLI process runs on 1 device, this one on 8).
    diff = np.abs(image.astype(int) - samples.images[0].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    # ... and the context matters: another prompt gives another image.
    other = np.abs(image.astype(int) - samples.images[1].astype(int))
    assert other.max() > 8 and other.mean() > 0.5, (other.max(), other.mean())

    ids = np.load(out / rec["ids"])
    assert ids.shape == (64, 64) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, samples.maps[0])
    assert set(np.unique(ids)) <= set(coco.category_names())
    assert _read_png(out / rec["map"]).shape[0] >= 256
    assert (out / "grid.png").exists()


def test_sampling_without_prepared_data_matches_and_needs_prompts(setup, expected, tmp_path):
    config = setup["config"].copy_and_resolve_references()
    config.data.update(dir="", clip=str(setup["clip_dir"]), vae=str(setup["vae_dir"]))
    config.sample.update(prompt=PROMPT, seed=SEED, out_dir=str(tmp_path / "a"))
    out = sample_mode.run(config, str(setup["workdir"]))
    image = _read_png(out / "000_image.png")
    samples = expected[0]
    diff = np.abs(image.astype(int) - samples.images[0].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())

    config.sample.prompt = ""
    with pytest.raises(ValueError, match=re.escape("--config.sample.prompt")):
        sample_mode.run(config, str(setup["workdir"]))
    config.sample.prompt = PROMPT
    config.model.clip_dim = 768
    with pytest.raises(ValueError, match=r"shape \(16, 32\).*\(16, 768\)"):
        sample_mode.dataset_info(specs.from_config(config).data)
    config.model.clip_dim = 32
    config.data.clip = ""
    with pytest.raises(FileNotFoundError, match="--text_encoder"):
        sample_mode.dataset_info(specs.from_config(config).data)


def test_weight_flags_reject_missing_paths_and_non_coco_configs(setup, tmp_path):
    missing = tmp_path / "no_such_clip"
    # Both processes at once: most of their time is importing.
    bad_path = _start_main(*_coco_args(setup, tmp_path / "x"), f"--text_encoder={missing}")
    synthetic = _start_main(
        "--config=configs/pdm.py:demo,tiny=1",
        f"--workdir={tmp_path}",
        "--mode=sample",
        f"--vae={setup['vae_dir']}",
    )
    code, stderr = _finish(bad_path)
    assert code == 1
    assert f"--text_encoder={missing}: the path does not exist" in stderr
    code, stderr = _finish(synthetic)
    assert code == 1
    assert "--text_encoder/--vae apply to COCO configs" in stderr
    assert "'synthetic'" in stderr
