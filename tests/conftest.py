"""Test-wide setup: CPU only, 8 fake devices, set before jax is imported anywhere."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The test process is the application: like an absl program, it parses (here: takes the
# defaults of) the absl flags that libraries read, e.g. grain's worker-process flags.
from absl import flags

flags.FLAGS.mark_as_parsed()
