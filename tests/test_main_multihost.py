"""Multi-process runs of ``python -m pdm_jax.main --distributed``: 2 processes × 4 CPU devices.

The processes join through a coordinator on 127.0.0.1 and reduce over gloo, so the real
multi-process code paths run: ``make_array_from_process_local_data`` batches, orbax's
collective save, JAX's preemption sync, the sampler's global inputs, evaluation's and
sample mode's per-process slices. The 1 process × 8 devices references run in this test
process (tests/conftest.py gives it 8 devices). Runs are shared between assertions: the
CPU has 2 cores.
"""

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from configs.pdm import get_config
from pdm_jax import checkpointing
from pdm_jax.evaluation import run as evaluate
from pdm_jax.sampling import mode as sample_mode
from pdm_jax.train import trainer
from tests.cli import describe, run_processes

pytestmark = pytest.mark.slow

VARIANT = "demo,tiny=1"
SETTINGS = {  # a handful of steps, a step-2 checkpoint, the sample grid once
    "train.log_every_steps": 1,
    "train.checkpoint_every_steps": 2,
    "train.eval_every_steps": 2,
    "ckpt.max_to_keep": 20,
    "demo.use_metrics": False,
    "eval.num_samples": 6,
    "eval.batch_size": 4,
    "sample.num_samples": 3,
    "sample.batch_size": 4,
}
# Parameters after the same steps on 1 × 8 and 2 × 4 devices: the same batches and random
# numbers; only the order of the cross-device sums differs (float32 rounding). Adam divides
# each gradient by its own scale, so a near-zero gradient's rounding moves its parameter by
# up to ~1e-3 of a step (learning rate 4e-3): atol 2e-5.
RTOL, ATOL = 1e-4, 2e-5


def _flags(**overrides) -> list[str]:
    values = {**SETTINGS, **overrides}
    return [f"--config={_config_path()}", *(f"--config.{k}={v}" for k, v in values.items())]


def _config_path() -> str:
    return f"configs/pdm.py:{VARIANT}"


def _config(**overrides):
    config = get_config(VARIANT)
    for key, value in {**SETTINGS, **overrides}.items():
        group, name = key.split(".")
        config[group][name] = value
    return config


def _params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(workdir), read_only=True)
    state = checkpointing.read_state_on_host(manager, step)
    return traverse_util.flatten_dict(dict(state["params"]), sep="/")


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=k)


def _stopped_step(stderr: str) -> int:
    marker = "every process saves step "
    assert marker in stderr, stderr[-3000:]
    return int(stderr.split(marker, 1)[1].split(",", 1)[0])


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """A 2 × 4 run from scratch, SIGTERM to process 1 only once it has logged step 3."""
    workdir = tmp_path_factory.mktemp("two_processes")
    results = run_processes(
        *_flags(**{"train.num_train_steps": 10_000}),
        f"--workdir={workdir}",
        num_processes=2,
        devices=4,
        signal_when=(1, "] [3] ", signal.SIGTERM),
    )
    return workdir, results


def test_preemption_of_one_process_stops_all_at_one_step(preempted):
    workdir, results = preempted
    assert [r.returncode for r in results] == [128 + signal.SIGTERM] * 2, describe(results)
    steps = [_stopped_step(r.stderr) for r in results]
    assert steps[0] == steps[1] >= 3  # the sync step: not before the one signalled at
    manager = checkpointing.create_manager(checkpointing.checkpoint_dir(workdir), read_only=True)
    assert manager.latest_step() == steps[0]


@pytest.fixture(scope="module")
def one_process(preempted, tmp_path_factory):
    """1 process × 8 devices (this one), the same config, past the preempted run's step.

    Returns:
      ``(workdir, last step)``; it holds a checkpoint for every step.
    """
    workdir = tmp_path_factory.mktemp("one_process")
    last = max(_stopped_step(preempted[1][0].stderr), 4)
    config = _config(**{"train.num_train_steps": last, "train.checkpoint_every_steps": 1})
    trainer.train_and_evaluate(config, str(workdir))
    return workdir, last


def test_two_processes_train_like_one(preempted, one_process):
    workdir, results = preempted
    one, _ = one_process
    stop = _stopped_step(results[0].stderr)
    _assert_same_params(_params(workdir, stop), _params(one, stop))
    # Only process 0 writes events and sample grids (one every 2 steps before the stop,
    # which the signal's timing decides: at the stop step the trainer saves and exits
    # before the grid); both write their checkpoint shards.
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
    grids = [f"step_{s:07d}.png" for s in range(2, stop, 2)]
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == grids
    grid = np.asarray(Image.open(workdir / "samples" / "step_0000002.png"))
    reference = np.asarray(Image.open(one / "samples" / "step_0000002.png"))
    assert grid.shape == reference.shape
    assert np.mean(np.abs(grid.astype(int) - reference)) < 1.0
    state_dir = workdir / "checkpoints" / str(stop) / "state"
    assert {p.name for p in state_dir.glob("ocdbt.process_*")} == {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }
    # Each process read its own rows of the global batches: 2 steps × 4 rows, sampler
    # indices p, p + 2, p + 4, … (grain's state names the last one it read).
    data = workdir / "checkpoints" / "2" / "data"
    for p in range(2):
        saved = json.loads((data / f"process_{p}-of-2.json").read_text())
        assert saved["last_seen_indices"] == {"0": (2 * 4 - 1) * 2 + p}


def test_two_process_checkpoint_resumes_on_one_process(preempted, tmp_path):
    workdir, results = preempted
    stop = _stopped_step(results[0].stderr)
    step_2 = str(workdir / "checkpoints" / "2")
    resume = {"ckpt.resume_from": step_2, "train.num_train_steps": stop}
    with pytest.raises(checkpointing.ConfigMismatchError, match="reset_data_position=True"):
        trainer.train_and_evaluate(_config(**resume), str(tmp_path / "refused"))
    assert not (tmp_path / "refused" / "checkpoints" / str(stop)).exists()
    here = tmp_path / "resumed"
    trainer.train_and_evaluate(_config(**resume, **{"ckpt.reset_data_position": True}), str(here))
    _assert_same_params(_params(here, stop), _params(workdir, stop))


def test_one_process_checkpoint_resumes_on_two_processes(one_process, tmp_path):
    one, _ = one_process
    two = tmp_path / "two_processes"
    resume = {
        "train.num_train_steps": 4,
        "train.eval_every_steps": 0,
        "ckpt.resume_from": one / "checkpoints" / "2",
        "ckpt.reset_data_position": True,
    }
    results = run_processes(*_flags(**resume), f"--workdir={two}", num_processes=2, devices=4)
    assert [r.returncode for r in results] == [0, 0], describe(results)
    assert "Data order taken up at step 2" in results[1].stderr
    _assert_same_params(_params(two, 4), _params(one, 4))


def test_evaluate_on_two_processes_splits_the_samples(one_process, tmp_path):
    one, last = one_process
    results = run_processes(
        *_flags(), f"--workdir={one}", "--mode=evaluate", num_processes=2, devices=4
    )
    assert [r.returncode for r in results] == [0, 0], describe(results)
    # Each process sampled its 3 of the 6 samples; the metrics are those of 1 process.
    for p, r in enumerate(results):
        assert f"sampling (cogenerate) process {p}: 100%" in r.stderr
        assert "3/3" in r.stderr
    two = json.loads((one / "eval" / str(last) / "metrics.json").read_text())["cogenerate"]
    alone = tmp_path / "alone"
    shutil.copytree(one / "checkpoints", alone / "checkpoints")
    single = evaluate.run_evaluate(_config(), str(alone))
    assert two.keys() == single.keys() and two["num_samples"] == 6
    scores = [k for k, v in single.items() if isinstance(v, float) and k != "scoring_seconds"]
    assert {"mcd", "map_image_agreement", "caption_recall"} <= set(scores)
    assert {k: two[k] for k in scores} == pytest.approx({k: single[k] for k in scores})
    ours = sorted((one / "eval" / str(last) / "samples_cogenerate").glob("*.png"))
    theirs = sorted((alone / "eval" / str(last) / "samples_cogenerate").glob("*.png"))
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == 12


def test_sample_on_two_processes_writes_each_sample_once(one_process, tmp_path):
    one, last = one_process
    results = run_processes(
        *_flags(), f"--workdir={one}", "--mode=sample", num_processes=2, devices=4
    )
    assert [r.returncode for r in results] == [0, 0], describe(results)
    out = one / f"sample_cogenerate_step{last}"
    meta = json.loads((out / "samples.json").read_text())
    wrote = [r.stderr.split(" wrote samples ", 1)[1].split(" ", 1)[0] for r in results]
    n = len(meta["samples"])
    assert wrote == [f"0..{n // 2 - 1}", f"{n // 2}..{n - 1}"]  # each sample by one process
    alone = sample_mode.run(_config(**{"sample.out_dir": str(tmp_path / "alone")}), str(one))
    assert json.loads((alone / "samples.json").read_text())["samples"] == meta["samples"]
    for rec in meta["samples"]:
        np.testing.assert_array_equal(np.load(out / rec["ids"]), np.load(alone / rec["ids"]))
