"""Host CPU device splitting (``sharding.cpu_devices``) and the XLA options of programs."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pdm as pdm_configs
from pdm_jax import runtime, sharding


@pytest.mark.parametrize(
    ("requested", "batch", "cores", "want"),
    [
        (0, 16, 2, 0),  # keep JAX's one device
        (-1, 16, 2, 2),  # one per core
        (-1, 16, 3, 2),  # reduced to a divisor of the batch
        (-1, 12, 5, 4),
        (-1, 7, 4, 1),
        (4, 16, 2, 4),  # explicit counts are taken as given
    ],
)
def test_host_cpu_devices(requested, batch, cores, want):
    assert runtime.host_cpu_devices(requested, batch, cores=cores) == want


@pytest.mark.parametrize(("requested", "match"), [(3, "divide the batch"), (-2, "use 0, -1")])
def test_host_cpu_devices_rejects_bad_counts(requested, match):
    with pytest.raises(ValueError, match=match):
        runtime.host_cpu_devices(requested, 16, cores=2)


def test_cpu_devices_are_not_changed_once_backends_exist(caplog):
    jax.devices()  # initialises the backends (8 fake devices, see conftest)
    assert not runtime.use_cpu_devices(2)
    config = pdm_configs.get_config("demo")
    config.sharding.cpu_devices = 2
    assert runtime.setup_cpu_devices(config, 16) == 2
    assert "sharding.cpu_devices=2 not applied" in caplog.text
    assert jax.device_count() == 8


def test_no_batch_means_no_split(caplog):
    config = pdm_configs.get_config("demo")
    config.sharding.cpu_devices = 3  # would not divide any of the demo's batches
    assert runtime.setup_cpu_devices(config, None) == 0
    assert "not applied" not in caplog.text


_PROBE = """
import os, sys, jax
from pdm_jax import runtime, sharding
if "--devices-first" in sys.argv:
    jax.devices()  # initialises the backends before the split is asked for
applied = runtime.use_cpu_devices(2)
mesh = sharding.create_mesh()
print(applied, jax.device_count(), mesh.shape["data"], os.environ.get("XLA_FLAGS", ""))
"""


def _probe(xla_flags: str, *args: str) -> list[str]:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True, check=True
    )
    return [*out.stdout.split(maxsplit=3), ""][:4]


def test_a_fresh_process_gets_single_threaded_devices_on_the_data_axis():
    applied, count, data, flags = _probe("")
    assert (applied, count, data) == ("True", "2", "2")
    assert "--xla_cpu_multi_thread_eigen=false" in flags


def test_an_explicit_xla_device_count_wins():
    applied, count, data, _ = _probe("--xla_force_host_platform_device_count=3")
    assert (applied, count, data) == ("False", "3", "3")


def test_a_process_whose_backends_exist_keeps_its_devices_and_flags():
    # No XLA_FLAGS device count here: only JAX's refusal to change jax_num_cpu_devices
    # after initialisation (a RuntimeError) stops the split.
    applied, count, data, flags = _probe("", "--devices-first")
    assert (applied, count, data, flags) == ("False", "1", "1", "")


def test_inference_compiler_options_only_for_cpu_meshes():
    mesh = sharding.create_mesh()  # the tests' 8 CPU devices: YNNPACK stays
    assert runtime.inference_compiler_options(mesh) == runtime.CPU_INFERENCE_OPTIONS
    one = sharding.create_mesh(devices=jax.devices()[:1])
    assert runtime.inference_compiler_options(one) == {
        **runtime.CPU_INFERENCE_OPTIONS,
        "xla_cpu_experimental_ynn_fusion_type": "",
    }

    class Device:
        platform = "tpu"

    class Mesh:
        devices = np.array([Device()])

    assert runtime.inference_compiler_options(Mesh()) is None
