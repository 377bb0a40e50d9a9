"""Tests of the grain input pipeline: record normalisation, seeded order, resumable iterators."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import pdm as pdm_configs
from pdm_jax import specs
from pdm_jax.data import pipeline, schema
from pdm_jax.diffusion import maps


def _tiny_config(**data):
    c = pdm_configs.get_config("demo,tiny=1")
    c.data.update(num_workers=0, num_threads=1, prefetch=8, num_records=64, **data)
    return c


class _ToySource:
    """Records whose latent encodes the index, with a 2× map and several captions."""

    def __init__(self, n=40, side=8, map_side=16):
        self.n, self.side, self.map_side = n, side, map_side

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return {
            "latent": np.full((self.side, self.side, 3), float(i), np.float32),
            "map": rng.choice([5, 92, 150], (self.map_side, self.map_side)).astype(np.int64),
            "contexts": np.stack([np.full((4, 16), 10.0 * i + k, np.float32) for k in range(3)]),
        }


def test_normalise_latent_map_and_context_choice():
    record = _ToySource()[3]
    norm = pipeline.NormaliseRecord(map_size=8, map_pooling="min", latent_scale=2.0)
    out = norm.random_map(record, np.random.default_rng(0))
    assert sorted(out) == sorted(schema.SCHEMA_KEYS)
    assert out["latent"].dtype == np.float32 and out["latent"].shape == (8, 8, 3)
    np.testing.assert_array_equal(out["latent"], 2.0 * record["latent"])
    np.testing.assert_array_equal(out["map"], maps.pool_map(record["map"].astype(np.int32), 8))
    assert out["map"].dtype == np.int32
    # One of the three captions of record 3 (values 30, 31, 32), chosen by the rng.
    assert out["context"].shape == (4, 16) and float(out["context"][0, 0]) in (30.0, 31.0, 32.0)


def test_normalise_draws_latents_from_moments():
    mean = np.full((2, 2, 4), 1.5, np.float32)
    logvar = np.full((2, 2, 4), np.log(0.25), np.float32)
    record = {"moments": np.concatenate([mean, logvar], -1), "context": np.zeros((4, 16))}
    norm = pipeline.NormaliseRecord(map_size=None, latent_scale=0.5)
    out = norm.random_map(record, np.random.default_rng(7))
    eps = np.random.default_rng(7).standard_normal((2, 2, 4), dtype=np.float32)
    np.testing.assert_allclose(out["latent"], (1.5 + 0.5 * eps) * 0.5, rtol=1e-6)
    assert "map" not in out


def test_normalise_errors_name_the_missing_keys():
    norm = pipeline.NormaliseRecord(map_size=8)
    with pytest.raises(KeyError, match="neither 'latent' nor 'moments'"):
        norm.random_map({"context": np.zeros((4, 16))}, np.random.default_rng(0))
    with pytest.raises(KeyError, match="needs maps"):
        norm.random_map(
            {"latent": np.zeros((8, 8, 3)), "context": np.zeros((4, 16))},
            np.random.default_rng(0),
        )


def _first_batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_schema_and_seeded_order():
    config = _tiny_config()
    source, _ = pipeline.create_source(specs.from_config(config).data)
    batches = _first_batches(
        pipeline.create_loader(
            source, specs.from_config(config).data, batch_size=config.train.batch_size
        ),
        2,
    )
    b = batches[0]
    m = config.model
    assert b["latent"].shape == (8, m.img_size, m.img_size, m.in_chans)
    assert b["map"].shape == (8, m.img_size, m.img_size) and b["map"].dtype == np.int32
    assert b["context"].shape == (8, m.num_clip_token, m.clip_dim)
    again = _first_batches(
        pipeline.create_loader(
            source, specs.from_config(config).data, batch_size=config.train.batch_size
        ),
        2,
    )
    for x, y in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x["latent"], y["latent"])
    config.data.seed = 1
    other = _first_batches(
        pipeline.create_loader(
            pipeline.create_source(specs.from_config(config).data)[0],
            specs.from_config(config).data,
            batch_size=config.train.batch_size,
        ),
        1,
    )
    assert not np.array_equal(other[0]["latent"], batches[0]["latent"])


def test_loader_iterator_state_resumes_exactly():
    config = _tiny_config(latent_scale=1.0)
    source = _ToySource(n=40)
    config.model.img_size = 8
    config.model.map_patch_factor = 1
    loader = pipeline.create_loader(
        source, specs.from_config(config).data, batch_size=config.train.batch_size
    )
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (40 records, 8/batch)
    resumed = iter(loader)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["latent"], want["latent"])
        np.testing.assert_array_equal(got["context"], want["context"])
    # Every epoch is a permutation: 5 batches of 8 cover the 40 indices exactly once.
    it = iter(loader)
    firsts = np.concatenate([next(it)["latent"][:, 0, 0, 0] for _ in range(5)])
    assert sorted(firsts.astype(int).tolist()) == list(range(40))


def test_processes_read_their_rows_of_one_global_order():
    def sampler(count):
        return pipeline.GlobalOrderSampler(
            40, global_batch_size=8, process_count=count, shuffle=True, num_epochs=2, seed=3
        )

    one, two = sampler(1), sampler(2)
    assert len(one) == len(two) == 80  # whole global batches only
    # grain hands process p of 2 the sampler indices p, p + 2, …; its local record i is
    # row (i mod 4) of its half of global batch i // 4.
    for p in range(2):
        local = [two[p + 2 * i] for i in range(12)]  # 3 local batches of 4
        batches = [range(k * 8 + p * 4, k * 8 + p * 4 + 4) for k in range(3)]
        want = [one[g] for batch in batches for g in batch]
        assert [m.record_key for m in local] == [m.record_key for m in want]
        assert [m.rng.random() for m in local] == [m.rng.random() for m in want]
    assert "process_count=2" in repr(two)  # grain refuses a state of another count
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        sampler(3)


def test_seek_takes_up_the_order_after_a_number_of_batches():
    config = _tiny_config(latent_scale=1.0)
    config.model.update(img_size=8, map_patch_factor=1)
    data = specs.from_config(config).data
    loader = pipeline.create_loader(_ToySource(n=40), data, batch_size=8)
    it = iter(loader)
    for _ in range(7):  # across an epoch boundary
        next(it)
    moved = iter(loader)
    pipeline.seek(moved, 7, 8)
    assert moved.get_state() == it.get_state()
    np.testing.assert_array_equal(next(moved)["latent"], next(it)["latent"])


def test_batch_size_must_divide_over_devices():
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        pipeline.per_process_batch_size(12)
    assert pipeline.per_process_batch_size(16) == 16


def test_unknown_source_lists_the_available_ones():
    config = _tiny_config()
    config.data.source = "imagenet"
    with pytest.raises(ValueError, match="available: \\['coco', 'synthetic'\\]"):
        pipeline.create_source(specs.from_config(config).data)


@pytest.mark.slow
def test_worker_processes_read_the_same_records_and_resume():
    config = _tiny_config()
    source, _ = pipeline.create_source(specs.from_config(config).data)
    inline = _first_batches(
        pipeline.create_loader(
            source, specs.from_config(config).data, batch_size=config.train.batch_size
        ),
        2,
    )
    config.data.num_workers = 2
    loader = pipeline.create_loader(
        source, specs.from_config(config).data, batch_size=config.train.batch_size
    )
    it = iter(loader)
    workers = [next(it) for _ in range(2)]
    state = it.get_state()
    following = next(it)

    # Each worker batches its own share of the shuffled order (round robin), so the first
    # two batches hold the same records as the in-process loader's, in another grouping.
    def records(batches):
        return sorted(np.concatenate([b["latent"] for b in batches]).reshape(16, -1).tolist())

    assert records(inline) == records(workers)
    resumed = iter(loader)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["latent"], following["latent"])
    moved = iter(loader)  # seek knows how the workers share the batches
    pipeline.seek(moved, 2, config.train.batch_size)
    assert moved.get_state() == state


def test_workers_outside_an_absl_program_are_refused_with_the_fix():
    code = (
        "from configs import pdm\n"
        "from pdm_jax import specs\n"
        "from pdm_jax.data import pipeline\n"
        "c = pdm.get_config('demo,tiny=1')\n"
        "c.data.update(num_workers=2, num_records=16)\n"
        "run = specs.from_config(c)\n"
        "source, _ = pipeline.create_source(run.data)\n"
        "try:\n"
        "    pipeline.create_loader(source, run.data, batch_size=8)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert "mark_as_parsed()" in out.stdout and "data.num_workers=0" in out.stdout, out.stderr
