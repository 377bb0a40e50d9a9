"""Start-up checks (``pdm_jax.preflight`` and the modes' own, ``pdm_jax.modes``) and the
trainer's save-before-grid order."""

import logging

import jax
import numpy as np
import pytest

from configs import pdm as pdm_configs
from pdm_jax import checkpointing, models, modes, preflight, sharding, specs
from pdm_jax.models.vae import AutoencoderKL
from pdm_jax.train import init as init_lib
from pdm_jax.train import trainer
from pdm_jax.weights import components
from tests.cli import run_main
from tests.data import fake_coco
from tests.train import saved_states


def _check(config, mode, workdir):
    """Every start-up check of ``mode`` (what ``python -m pdm_jax.main`` runs first)."""
    return modes.get(mode).check(config, workdir)


def _two_stream():
    c = pdm_configs.get_config("two_stream,tiny=1")
    c.data.update(source="synthetic", num_workers=0, num_records=256)
    c.model.update(in_chans=3, map_patch_factor=1)
    return c


def _restore(config, workdir):
    mesh = sharding.create_mesh()
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(workdir))
    return init_lib.restore_or_initialize(specs.from_config(config), workdir, mesh, manager)


def test_two_stream_from_scratch_is_refused_before_the_state_is_built(tmp_path, monkeypatch):
    config = _two_stream()
    built = []
    monkeypatch.setattr(
        init_lib.state_lib, "create_train_state", lambda *a: built.append(1) or 1 / 0
    )
    with pytest.raises(preflight.PreflightError) as info:
        _restore(config, tmp_path)
    message = str(info.value)
    assert "--config.ckpt.init_from=<U-ViT checkpoint>" in message
    assert "--config.ckpt.allow_random_frozen_stream=True" in message
    assert not built
    with pytest.raises(preflight.PreflightError, match="init_from"):
        _check(config, "train", str(tmp_path))
    # Not a frozen stream, or something to start from: no objection.
    for update in (
        dict(allow_random_frozen_stream=True),
        dict(freeze_image_stream=False),
        dict(init_from=str(tmp_path / "uvit")),
        dict(resume_from=str(tmp_path / "run")),
    ):
        c = _two_stream()
        c.ckpt.update(**update)
        _check(c, "train", str(tmp_path))
    # A workdir with a checkpoint resumes it.
    shapes = models.abstract_params(config.model)
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    saved_states.save_state(tmp_path / "own", saved_states.params_only_state(params), config)
    _check(config, "train", str(tmp_path / "own"))


def test_allowed_random_frozen_stream_starts_from_scratch(tmp_path, caplog):
    config = _two_stream()
    config.ckpt.allow_random_frozen_stream = True
    with caplog.at_level(logging.WARNING):
        state, _, origin = _restore(config, tmp_path)
    assert origin == "from scratch" and int(state.step) == 0
    assert "allow_random_frozen_stream=True" in caplog.text


def test_main_refuses_two_stream_from_scratch_without_a_traceback(tmp_path):
    result = run_main("--config=configs/pdm.py:two_stream,tiny=1", f"--workdir={tmp_path}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: This two-stream PDM freezes its image stream" in result.stderr
    assert "--config.ckpt.allow_random_frozen_stream=True" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny VAE in the ``python -m pdm_jax.convert vae`` layout."""
    vae = AutoencoderKL(fake_coco.TINY_VAE)
    shapes = jax.eval_shape(vae.init, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes["params"])
    path = tmp_path_factory.mktemp("weights") / "vae"
    components.save_component(str(path), "vae", params, fake_coco.TINY_VAE)
    return str(path)


def _coco(**data):
    c = pdm_configs.get_config("one_stream,tiny=1")
    c.data.update(**{"source": "coco", "dir": "/data/coco_pdm", **data})
    c.train.eval_every_steps = 1000
    return c


def test_coco_training_without_a_vae_turns_the_grids_off_with_a_warning(tmp_path, caplog):
    config = _coco()
    with caplog.at_level(logging.WARNING):
        run = _check(config, "train", str(tmp_path))
    assert run.train.eval_every_steps == 0
    assert "Sample grids are off" in caplog.text and "--vae=PATH" in caplog.text


def test_coco_training_refuses_a_vae_it_cannot_load(tmp_path, vae_dir):
    with pytest.raises(preflight.PreflightError, match=r"data.vae=.*no_such_vae.*--vae=PATH"):
        _check(_coco(vae=str(tmp_path / "no_such_vae")), "train", str(tmp_path))
    garbage = tmp_path / "autoencoder_kl.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(preflight.PreflightError, match="cannot be loaded"):
        _check(_coco(vae=str(garbage)), "train", str(tmp_path))
    config = _coco(vae=vae_dir)
    run = _check(config, "train", str(tmp_path))
    assert run.train.eval_every_steps == 1000
    config = _coco(vae=vae_dir, dir="")
    with pytest.raises(preflight.PreflightError, match=r"--config.data.dir="):
        _check(config, "train", str(tmp_path))


def test_coco_sampling_needs_the_vae_and_clip_only_for_raw_prompts(tmp_path, vae_dir):
    with pytest.raises(preflight.PreflightError, match="--vae=PATH"):
        _check(_coco(), "sample", str(tmp_path))
    config = _coco(vae=vae_dir)
    _check(config, "sample", str(tmp_path))  # dataset captions, stored contexts
    config.sample.prompt = "a dog on a wooden floor"
    with pytest.raises(preflight.PreflightError, match=r"raw prompts.*--text_encoder=DIR"):
        _check(config, "sample", str(tmp_path))
    config = _coco(vae=vae_dir, dir="")
    with pytest.raises(preflight.PreflightError, match=r"without data.dir.*--text_encoder"):
        _check(config, "sample", str(tmp_path))
    config = _coco(vae=vae_dir, clip=str(tmp_path / "no_clip"))
    config.sample.prompts_file = str(tmp_path / "prompts.txt")
    with pytest.raises(preflight.PreflightError, match=r"data.clip=.*no_clip.*cannot be loaded"):
        _check(config, "sample", str(tmp_path))


def test_evaluation_files_are_checked_before_sampling(tmp_path, vae_dir, caplog):
    config = _coco(vae=vae_dir)
    _check(config, "evaluate", str(tmp_path))
    config.eval.fid_stats = str(tmp_path / "missing.npz")
    with pytest.raises(preflight.PreflightError, match=r"eval.fid_stats=.*missing.npz"):
        _check(config, "evaluate", str(tmp_path))
    (tmp_path / "bad.npz").write_bytes(b"truncated")
    config.eval.fid_stats = str(tmp_path / "bad.npz")
    with pytest.raises(preflight.PreflightError, match="cannot be read"):
        _check(config, "evaluate", str(tmp_path))
    np.savez(tmp_path / "ok.npz", mu=np.zeros(4), sigma=np.eye(4))
    config.eval.fid_stats = str(tmp_path / "ok.npz")
    with caplog.at_level(logging.WARNING):
        _check(config, "evaluate", str(tmp_path))
    assert "FID is skipped" in caplog.text
    config.eval.inception = str(tmp_path / "no_inception.pth")
    with pytest.raises(preflight.PreflightError, match=r"eval.inception=.*does not exist"):
        _check(config, "evaluate", str(tmp_path))
    config = _coco()
    with pytest.raises(preflight.PreflightError, match=r"Evaluation decodes.*--vae=PATH"):
        _check(config, "evaluate", str(tmp_path))
    config.eval.task = "given_image"  # decodes no image: no VAE needed
    _check(config, "evaluate", str(tmp_path))
    # The synthetic world needs no weights.
    _check(pdm_configs.get_config("demo,tiny=1"), "evaluate", str(tmp_path))


def test_evaluation_task_sweep_and_mask_are_checked_before_sampling(tmp_path):
    def refused(match, **changes):
        config = pdm_configs.get_config("demo,tiny=1")
        config.eval.update(**changes)
        with pytest.raises(preflight.PreflightError, match=match):
            _check(config, "evaluate", str(tmp_path))

    refused(r"eval.task='segment'.*given_image", task="segment")
    refused("eval.sweep method 'euler'", sweep="euler:10")
    refused("NFE,NFE", sweep="fast:")
    refused("has no order 3", sweep="sde_multistep/3:10")
    refused(r"mask_fraction=1.5 must lie in \(0, 1\)", task="inpaint", mask_fraction=1.5)
    refused("FID and the CLIP score do not apply", task="given_image", clip=str(tmp_path))
    uvit = pdm_configs.get_config("uvit,tiny=1")
    uvit.data.source = "synthetic"
    uvit.eval.task = "inpaint"
    with pytest.raises(preflight.PreflightError, match="needs a PDM"):
        _check(uvit, "evaluate", str(tmp_path))


def test_a_bad_learning_rate_schedule_is_refused_at_start_up(tmp_path):
    config = pdm_configs.get_config("demo,tiny=1")
    config.optim.update(decay="wsd", decay_fraction=1.5)
    with pytest.raises(preflight.PreflightError, match=r"decay_fraction=1.5 must lie in \(0, 1\]"):
        _check(config, "train", str(tmp_path))
    config.optim.decay = "step"
    with pytest.raises(preflight.PreflightError, match=r"Unknown optim\.decay 'step'"):
        _check(config, "train", str(tmp_path))
    config.optim.decay = "wsd"
    config.optim.decay_fraction = 0.2
    _check(config, "train", str(tmp_path))  # a good one passes


@pytest.mark.parametrize("mode", ["train", "sample", "evaluate"])
def test_token_fusion_outside_one_stream_is_refused_at_start_up(tmp_path, mode):
    config = _two_stream()
    config.model.token_fusion = True
    with pytest.raises(preflight.PreflightError, match="token_fusion=True is a one_stream"):
        _check(config, mode, str(tmp_path))


def test_the_checkpoint_of_a_step_is_saved_before_its_grid(tmp_path, monkeypatch):
    """A grid that fails (e.g. no VAE) loses no training: the step's checkpoint is there."""
    config = pdm_configs.get_config("demo,tiny=1")
    config.data.update(num_workers=0, num_threads=1, prefetch=8, num_records=256)
    config.train.update(
        num_train_steps=2,
        log_every_steps=1,
        eval_every_steps=2,
        checkpoint_every_steps=2,
        num_eval_prompts=2,
    )

    def failing_grid(*args):
        raise FileNotFoundError("Decoding COCO latents needs the VAE")

    monkeypatch.setattr(trainer, "_write_sample_grid", failing_grid)
    with pytest.raises(FileNotFoundError, match="needs the VAE"):
        trainer.train_and_evaluate(config, str(tmp_path))
    root = checkpointing.checkpoint_dir(tmp_path)
    assert checkpointing.locate(root) == (root, 2)


def test_a_mesh_that_does_not_fit_the_devices_or_the_batch_is_refused(tmp_path):
    config = _two_stream()
    config.ckpt.allow_random_frozen_stream = True
    config.sharding.mesh_shape = (3, 1, 1)  # 8 devices
    with pytest.raises(preflight.PreflightError, match="needs 3 devices"):
        _check(config, "train", str(tmp_path))
    config.sharding.mesh_shape = (1, -1, 1)
    config.train.batch_size = 12  # 8 batch shards
    with pytest.raises(preflight.PreflightError, match=r"data × fsdp = 8 batch shards"):
        _check(config, "train", str(tmp_path))
    config.sharding.mesh_shape = (1, -1, 2)  # 4 batch shards
    _check(config, "train", str(tmp_path))
    config.sharding.mesh_axes = ("data", "model", "tensor")
    with pytest.raises(preflight.PreflightError, match="mesh_axes"):
        _check(config, "sample", str(tmp_path))


@pytest.mark.parametrize("mode", ["train", "sample", "evaluate"])
def test_sampler_settings_are_refused_at_start_up_in_every_mode(tmp_path, mode):
    """Training would otherwise meet them at its first grid or after its last step."""

    def check(**sampler):
        config = pdm_configs.get_config("demo,tiny=1")
        config.sampler.update(**sampler)
        _check(config, mode, str(tmp_path))

    with pytest.raises(preflight.PreflightError, match=r"must be an int ≥ order = 3.*got 2"):
        check(method="fast", order=3, steps=2)
    with pytest.raises(preflight.PreflightError, match="unknown method 'euler'"):
        check(method="euler")
    with pytest.raises(preflight.PreflightError, match="has orders 1 and 2"):
        check(method="sde_multistep", order=3)
    with pytest.raises(preflight.PreflightError, match=r"sampler\.clip_x0=-1\.0 is negative"):
        check(clip_x0=-1.0)
    check(method="fast", order=3, steps=3)  # good settings pass


@pytest.mark.parametrize("mode", ["train", "sample", "evaluate"])
def test_data_source_and_diffusion_options_are_refused_at_start_up(tmp_path, mode):
    """The loss, the sampler and the data refused these only when they first ran."""

    def refused(match, group, **changes):
        config = pdm_configs.get_config("demo,tiny=1")
        config[group].update(**changes)
        with pytest.raises(preflight.PreflightError, match=match):
            _check(config, mode, str(tmp_path))

    refused(r"Unknown image_prediction 'epsilon'", "diffusion", image_prediction="epsilon")
    refused(r"Unknown map pooling 'majority'; choose one of", "diffusion", map_pooling="majority")
    refused(r"Data source 'imagenet' is not available", "data", source="imagenet")


def test_an_evaluation_sweep_replaces_the_sampler_settings(tmp_path):
    config = pdm_configs.get_config("demo,tiny=1")
    config.sampler.update(method="fast", order=3, steps=2)
    config.eval.sweep = "multistep/2:4"
    _check(config, "evaluate", str(tmp_path))
    with pytest.raises(preflight.PreflightError, match="got 2"):
        _check(config, "train", str(tmp_path))


def test_demo_metrics_settings_are_checked_before_training(tmp_path):
    config = pdm_configs.get_config("demo,tiny=1")
    _check(config, "train", str(tmp_path))
    config.demo.given_map_task = "inpainting"
    with pytest.raises(preflight.PreflightError, match=r"given_map_task='inpainting'.*inpaint"):
        _check(config, "train", str(tmp_path))
    uvit = pdm_configs.get_config("uvit,tiny=1")
    uvit.data.source = "synthetic"
    uvit.demo.use_metrics = True
    with pytest.raises(preflight.PreflightError, match="Demo metrics need a PDM"):
        _check(uvit, "train", str(tmp_path))
    uvit.demo.use_metrics = False  # no demo figures: nothing to object to
    _check(uvit, "train", str(tmp_path))


def test_sample_mode_checks_its_task_and_inputs_at_start_up(tmp_path):
    def check(name="demo,tiny=1", task="cogenerate", **sample):
        config = pdm_configs.get_config(name)
        config.data.source = "synthetic"
        config.sampler.task = task
        config.sample.update(**sample)
        _check(config, "sample", str(tmp_path))

    with pytest.raises(preflight.PreflightError, match=r"sampler\.task='segment' is not"):
        check(task="segment")
    with pytest.raises(preflight.PreflightError, match=r"needs a map stream.*'uvit'"):
        check("uvit,tiny=1", task="given_image", image="x.png")
    with pytest.raises(preflight.PreflightError, match=r"given_map needs --config\.sample\.map"):
        check(task="given_map")
    needs_image = r"given_image needs --config\.sample\.image"
    with pytest.raises(preflight.PreflightError, match=needs_image):
        check(task="given_image")
    with pytest.raises(preflight.PreflightError, match=r"inpaint needs --config\.sample\.mask"):
        check(task="inpaint", image="x.png")
    with pytest.raises(preflight.PreflightError, match=r"image and/or --config\.sample\.map"):
        check(task="inpaint", mask="m.png")
    with pytest.raises(preflight.PreflightError, match=r"sample\.map is set but task=cogenerate"):
        check(map="m.npy")  # it would be ignored
    with pytest.raises(preflight.PreflightError, match=r"mask is set but task=given_map.*inpaint"):
        check(task="given_map", map="m.npy", mask="k.png")
    check(task="inpaint", mask="m.png", map="m.npy")  # the files themselves are read later
    check("uvit,tiny=1")


def test_main_refuses_bad_sampler_steps_before_training(tmp_path):
    result = run_main(
        "--config=configs/pdm.py:demo,tiny=1",
        f"--workdir={tmp_path}",
        "--config.sampler.steps=2",
        "--config.sampler.order=3",
        "--config.sampler.method=fast",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "raise steps or lower order" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()
