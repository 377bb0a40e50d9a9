"""A damaged checkpoint is a message naming an intact step and the flag that uses it.

A tiny run writes checkpoints 1 and 2; the OCDBT data files of step 2 are then cut to
half their size, as a full disk or an incomplete copy leaves them.
"""

import os
import shutil
from pathlib import Path

import chex
import pytest

from configs import pdm as pdm_configs
from pdm_jax import checkpointing, sharding, specs
from pdm_jax.evaluation import run as evaluate
from pdm_jax.sampling import mode as sample_mode
from pdm_jax.train import init as init_lib
from pdm_jax.train import trainer
from tests import jax_cache
from tests.cli import run_main


def _config(steps):
    c = pdm_configs.get_config("demo,tiny=1")
    c.data.update(num_workers=0, num_threads=1, prefetch=8, num_records=256)
    c.train.update(
        num_train_steps=steps, log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=1
    )
    c.sample.update(prompt="big ball top-left, sky over sea", batch_size=1)
    return c


def truncate_state(step_dir: Path) -> list[Path]:
    """Cuts every data file (``.../d/*``) of the step's state item to half its size."""
    cut = []
    for directory, _, names in os.walk(step_dir / checkpointing.STATE):
        if os.path.basename(directory) != "d":
            continue
        for name in names:
            path = Path(directory) / name
            if path.stat().st_size > 16:
                os.truncate(path, path.stat().st_size // 2)
                cut.append(path)
    assert cut
    return cut


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """One compilation cache for the module's runs (``tests/jax_cache.py``): the fixture's
    run and the resumed ones compile the same programs."""
    with jax_cache.compilation_cache_in(tmp_path_factory.mktemp("jax_cache")):
        yield


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A workdir with intact step 1 and truncated step 2 (a pristine copy is kept)."""
    root = tmp_path_factory.mktemp("corrupt")
    trainer.train_and_evaluate(_config(2), str(root / "pristine"))
    shutil.copytree(root / "pristine", root / "damaged")
    truncate_state(root / "damaged" / "checkpoints" / "2")
    return root


def _workdir(damaged, tmp_path) -> Path:
    shutil.copytree(damaged / "damaged", tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_resume_names_both_steps_and_the_suggested_flag_resumes(damaged, tmp_path):
    workdir = _workdir(damaged, tmp_path)
    ckpts = workdir / "checkpoints"
    with pytest.raises(checkpointing.CorruptCheckpointError) as info:
        trainer.train_and_evaluate(_config(3), str(workdir))
    message = str(info.value)
    assert f"Checkpoint {ckpts / '2'} cannot be read (ValueError: OUT_OF_RANGE" in message
    assert f"Step 1 ({ckpts / '1'}) can be read" in message
    assert f"--config.ckpt.resume_from={ckpts / '1'}" in message
    assert sorted(os.listdir(ckpts)) == ["1", "2"]  # nothing moved, nothing written

    config = _config(3)
    config.ckpt.resume_from = str(ckpts / "1")
    state = trainer.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 3
    assert sorted(os.listdir(ckpts)) == ["1", "2", "3"]
    assert os.listdir(workdir / init_lib.SUPERSEDED) == ["2"]  # the damaged step, kept
    # Step 2 was trained again from step 1: it is the uninterrupted run's step 2.
    again, _ = checkpointing.load_params(ckpts / "2")
    pristine, _ = checkpointing.load_params(damaged / "pristine" / "checkpoints" / "2")
    chex.assert_trees_all_equal(again, pristine)

    # A restart with the same flags continues from the latest step; it rolls nothing back.
    config.train.num_train_steps = 4
    state = trainer.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 4
    assert os.listdir(workdir / init_lib.SUPERSEDED) == ["2"]
    assert sorted(os.listdir(ckpts)) == ["2", "3", "4"]  # max_to_keep=3


def test_sample_and_evaluate_name_their_step_flag(damaged, tmp_path):
    workdir = damaged / "damaged"
    config = _config(2)
    with pytest.raises(checkpointing.CorruptCheckpointError) as info:
        sample_mode.run(config, str(workdir))
    message = str(info.value)
    assert f"Checkpoint {workdir / 'checkpoints' / '2'} cannot be read" in message
    assert "Step 1 (" in message and "Rerun with --config.sample.step=1" in message
    config.sample.update(step=1, out_dir=str(tmp_path / "samples"))
    out = sample_mode.run(config, str(workdir))
    assert (out / "000_image.png").is_file()

    config.eval.update(num_samples=2, batch_size=8)
    with pytest.raises(checkpointing.CorruptCheckpointError, match=r"--config\.eval\.step=1"):
        evaluate.run_evaluate(config, str(workdir))
    config.eval.step = 1
    evaluate.run_evaluate(config, str(workdir))
    assert (workdir / "eval" / "1" / "metrics.json").is_file()
    # ckpt.init_from of a damaged run names its intact step directory.
    config.ckpt.init_from = str(workdir)
    with pytest.raises(checkpointing.CorruptCheckpointError) as info:
        checkpointing.load_params(workdir, fix="Rerun with --config.ckpt.init_from={path}")
    assert f"--config.ckpt.init_from={workdir / 'checkpoints' / '1'}" in str(info.value)


def test_no_intact_step_says_so(damaged, tmp_path):
    workdir = _workdir(damaged, tmp_path)
    truncate_state(workdir / "checkpoints" / "1")
    with pytest.raises(checkpointing.CorruptCheckpointError) as info:
        checkpointing.load_params(workdir)
    message = str(info.value)
    assert "has no intact step to use instead (steps [1] cannot be read either)" in message


def test_main_prints_the_message_without_a_traceback(damaged):
    result = run_main(
        "--config=configs/pdm.py:demo,tiny=1",
        f"--workdir={damaged / 'damaged'}",
        "--mode=sample",
        "--config.sample.prompt=a ball",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: Checkpoint " in result.stderr
    assert "--config.sample.step=1" in result.stderr
    for noise in ("Traceback", "Exception ignored", "Event loop is closed"):
        assert noise not in result.stderr, result.stderr[-3000:]


def test_a_readable_checkpoint_of_another_optimizer_layout_is_a_config_mismatch(damaged):
    """Only files that cannot be read are 'corrupt': another layout stays a mismatch."""
    config = _config(2)
    config.optim.grad_clip_norm = 1.0  # one more optimizer stage: another opt_state tree
    mesh = sharding.create_mesh()
    target, _ = init_lib.abstract_train_state(specs.from_config(config), mesh)
    manager = checkpointing.create_manager(damaged / "pristine" / "checkpoints", read_only=True)
    with pytest.raises(checkpointing.ConfigMismatchError, match="optimizer state differs"):
        checkpointing.restore_state(manager, 2, target, config.model.name)
