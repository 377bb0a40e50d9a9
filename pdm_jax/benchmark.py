r"""python -m pdm_jax.benchmark --config=configs/pdm.py:two_stream --what=train_step --batch_size=8

Times one jitted program of the configured model after a warm-up and prints one JSON line
last: ``median_s``, ``min_s``, ``times_s`` (every timed call), ``items_per_s``,
``device``, ``peak_memory_bytes`` (device allocator peak where the backend reports one,
else the process's peak RSS), ``run_peak_memory_bytes`` (CPU: the peak RSS over the timed
calls alone, reset after the warm-up; None on accelerators), ``flops_per_device`` (XLA's
cost analysis of the SPMD program, which is one device's share; it counts a loop body
once: the chunked CPU attention's ``lax.map`` is undercounted), ``flops_per_item`` (summed
over the devices, so work every device repeats, such as the update of replicated
parameters, counts once per device), ``mfu`` (per-device FLOPs / time / the device's peak,
where the peak is known) and ``state_bytes_per_device`` (what one device holds of the
program's resident state: the train state for ``train_step``, the parameters for
``denoise`` and ``sample``).

``--what``: ``train_step`` (a full AdamW step; the two-stream image stream frozen),
``denoise`` (one network call, no CFG), ``sample`` (the whole DPM-Solver++ sampler with CFG,
``--steps`` steps), or ``plan``: compile, without running, the train step for
``--devices`` fake CPU devices on the configured mesh and report what one device would
hold::

    python -m pdm_jax.benchmark --what=plan --devices=64 --batch_size=512 \\
        --config=configs/pdm.py:two_stream,size=L --config.sharding.mesh_shape=1,16,4 \\
        --config.sharding.mesh_axes=data,fsdp,tensor

Its record: ``state_bytes_per_device``, ``temp_bytes_per_device`` /
``argument_bytes_per_device`` / ``output_bytes_per_device`` / ``alias_bytes_per_device``
(XLA's memory analysis of the compiled program), ``peak_bytes_per_device`` (arguments +
outputs − donated aliases + temporaries), ``flops_per_device`` and ``collectives`` (counts
of each collective op in the compiled HLO); ``--nocompile`` gives the state alone, in
seconds. The state is abstract (shapes and shardings), so planning a 256-chip model
allocates nothing. XLA:CPU's buffer assignment and fusion
differ from a TPU's or GPU's: temporaries are an estimate, the state exact.

``--reference=diffusers`` (``--what=denoise`` of a plain ``unet`` config, torch extra):
diffusers' PyTorch ``UNet2DConditionModel`` (the same ``unet_config``, float32, its own
random weights) runs the same shapes in a fresh process (so its peak RSS is its own) with
the same warm-up and repeats, its timed calls alternating with ours (ours, its, ours, ...:
both sides see the same drift of the machine's speed); the record gains ``reference``
(its ``median_s``, ``min_s``, ``times_s``, ``peak_memory_bytes``,
``run_peak_memory_bytes``, ``torch_threads``), ``time_ratio`` (our median / its median),
``paired_time_ratio`` (the median over the pairs of adjacent calls of ours / its),
``memory_ratio`` (our peak RSS over the timed calls / its, both measured from the warm-up
on) and ``process_memory_ratio`` (the whole processes' peaks, set-up and compilation
in)::

    python -m pdm_jax.benchmark --config=configs/pdm.py:unet,sd=1 --what=denoise \
        --batch_size=2 --reference=diffusers
"""

import dataclasses
import functools
import importlib.util
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from pdm_jax import models, process_memory, sharding, specs
from pdm_jax.models.spec import IMAGE_ONLY, UNET_NAMES
from pdm_jax.models.unet import resolve_config as resolve_unet_config
from pdm_jax.sampling import sampler as sampler_lib
from pdm_jax.sampling.params import param_shardings
from pdm_jax.train import state as state_lib
from pdm_jax.train import step as step_lib

# Dense bf16/fp32 peaks (FLOP/s) for MFU, by device kind substring; CPUs are not listed.
_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6": 918e12,
}


# Collective ops as XLA's HLO text names them (asynchronous ones add ``-start``/``-done``).
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def batch_shapes(config: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a training batch (the common schema) for the configured model."""
    m = config.model
    shapes = {
        "latent": jax.ShapeDtypeStruct(
            (batch_size, m.img_size, m.img_size, m.in_chans), np.float32
        ),
        "context": jax.ShapeDtypeStruct((batch_size, m.num_clip_token, m.clip_dim), np.float32),
    }
    if m.name not in IMAGE_ONLY:
        side = m.img_size * m.map_patch_factor
        shapes["map"] = jax.ShapeDtypeStruct((batch_size, side, side), np.int32)
    return shapes


def synthetic_batch(
    config: Any, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A random batch in the training schema for the configured model."""
    batch = {}
    for name, shape in batch_shapes(config, batch_size).items():
        if name == "map":
            batch[name] = rng.integers(0, 201, shape.shape).astype(shape.dtype)
        else:
            batch[name] = rng.standard_normal(shape.shape).astype(shape.dtype)
    return batch


def state_bytes_per_device(tree: Any) -> int:
    """Bytes of a sharded pytree that one device holds.

    Sums, over the leaves, the size of one shard (``sharding.shard_shape``: the addressable
    shard of device 0 for the even shardings used here). Works on arrays and on abstract
    ``jax.ShapeDtypeStruct`` leaves carrying a sharding, so nothing needs to be allocated.

    Args:
      tree: arrays or ``ShapeDtypeStruct``s with shardings (e.g. a ``TrainState``).

    Returns:
      The bytes per device.

    Raises:
      ValueError: for a leaf without a sharding.
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        if getattr(leaf, "sharding", None) is None:
            raise ValueError(f"A {leaf.dtype}{list(leaf.shape)} leaf has no sharding.")
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize
    return total


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many times each collective op occurs in a compiled module's HLO text.

    Args:
      hlo_text: ``compiled.as_text()``.

    Returns:
      ``{op: count}`` for every op of ``COLLECTIVES`` (asynchronous starts count as one).
    """
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _COLLECTIVE_OP.finditer(hlo_text):
        counts[match.group(1)] += 1
    return counts


def _program(
    config: Any,
    what: str,
    batch_size: int,
    steps: int | None,
    devices: Sequence[jax.Device] | None = None,
):
    """Returns ``(jitted_fn, args_fn, run)``.

    ``args_fn()`` gives the arguments to lower with; ``run(compiled)`` calls the compiled
    program once (threading the donated train state through). The batch is sharded over
    a mesh of ``devices`` (default: all).
    """
    mesh = sharding.create_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes, devices)
    batch = sharding.shard_batch(
        synthetic_batch(config, batch_size, np.random.default_rng(0)), mesh
    )
    empty = jnp.zeros((config.model.num_clip_token, config.model.clip_dim), jnp.float32)
    rng = jax.random.key(config.seed)
    if what == "train_step":
        state, shardings = state_lib.create_train_state(config, rng, mesh)
        fn = step_lib.jit_train_step(config, mesh, shardings, state.params, empty)
        holder = {"state": state}

        def run(compiled):
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        return fn, (lambda: (holder["state"], batch)), run
    placed = param_shardings(config.model, mesh)
    params = jax.jit(functools.partial(models.init_params, config.model), out_shardings=placed)(rng)
    denoise = models.denoise_fn(config.model)
    has_map = config.model.has_map
    m_t = None
    if has_map:
        side = config.model.img_size * config.model.map_patch_factor
        m_t = jnp.zeros((batch_size, side, side, config.model.num_bits), jnp.float32)
    t = jnp.full((batch_size,), 500.0)
    if what == "denoise":
        options = sharding.inference_compiler_options(mesh)  # as the sampler's programs
        fn = sharding.MeshProgram(jax.jit(denoise, compiler_options=options), mesh)
        args = (params, batch["latent"], m_t, t, batch["context"])
        return fn, (lambda: args), (lambda compiled: compiled(*args))
    solver = dataclasses.replace(config.sampler, steps=steps) if steps else config.sampler
    spec = sampler_lib.ProgramSpec(
        config.model, config.diffusion, solver, "cogenerate", (0, 1), mesh, (False,) * 4
    )
    fn = sampler_lib.program(spec)  # the program Sampler runs (per-example seeds)
    seeds = jax.device_put(np.arange(batch_size, dtype=np.uint32), sharding.batch_sharding(mesh))
    args = (params, seeds, batch["context"], empty, None, None, None, None)
    return fn, (lambda: args), (lambda compiled: compiled(*args))


REFERENCES = ("none", "diffusers")


def _reference_request(config: Any, batch_size: int, repeats: int, warmup: int) -> dict[str, Any]:
    """The request ``pdm_jax/torch_reference.py`` takes for the denoise shapes of ``config``
    (``repeats`` calls back to back; 0: one per ``run`` command on its stdin).

    Raises:
      ValueError: for a model other than the plain UNet, or without torch and diffusers.
    """
    config = specs.as_run_spec(config)
    m = config.model
    if m.name != "unet":
        raise ValueError(
            f"--reference=diffusers compares the plain SD UNet (configs/pdm.py:unet,...), "
            f"not model {m.name!r}."
        )
    missing = [name for name in ("torch", "diffusers") if importlib.util.find_spec(name) is None]
    if missing:  # checked here: the child's traceback would be less clear
        raise ValueError(
            f"--reference=diffusers needs torch and diffusers (the torch extra); missing: "
            f"{', '.join(missing)}."
        )
    return {
        "unet_config": resolve_unet_config(m.unet_config),
        "latent": [batch_size, m.in_chans, m.img_size, m.img_size],
        "context": [batch_size, m.num_clip_token, m.clip_dim],
        "timestep": 499,  # our t = 500 (the denoise benchmark's) is diffusers' index 499
        "warmup": warmup,
        "repeats": repeats,
    }


_REFERENCE_SCRIPT = str(pathlib.Path(__file__).with_name("torch_reference.py"))


def diffusers_reference(
    config: Any, batch_size: int, repeats: int = 5, warmup: int = 1
) -> dict[str, Any]:
    """Times diffusers' PyTorch ``UNet2DConditionModel`` forward on the denoise shapes,
    ``repeats`` calls back to back (``DiffusersReference`` alternates them with ours).

    Runs ``pdm_jax/torch_reference.py`` in a fresh process (no JAX in it), so that
    its peak RSS is PyTorch's own.

    Args:
      config: a run spec (or config) of the plain ``unet`` model.
      batch_size: the batch.
      repeats: timed calls.
      warmup: untimed calls after the first.

    Returns:
      ``{"median_s", "min_s", "times_s", "peak_memory_bytes", "peak_memory_source",
      "run_peak_memory_bytes", "torch_threads", "diffusers_unet_params"}``.

    Raises:
      ValueError: for a model other than the plain UNet, or without torch and diffusers.
      RuntimeError: when the reference process fails (with its stderr).
    """
    request = _reference_request(config, batch_size, repeats, warmup)
    result = subprocess.run(
        [sys.executable, _REFERENCE_SCRIPT, json.dumps(request)], capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(f"The diffusers reference failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class DiffusersReference:
    """diffusers' PyTorch UNet forward in a fresh process, timed one call at a time.

    ``start()`` builds and warms it up; each ``time_call()`` runs one timed forward there
    (our process idles meanwhile) and returns its seconds; ``finish()`` returns its record
    (``diffusers_reference``'s, over the calls made). ``run_benchmark(between=...)``
    alternates these calls with ours, so that both sides are timed over the same stretch
    of a machine whose speed drifts (on a shared 2-core VM the same forward wandered from
    11 to 17 s within minutes). Use it as a context manager: the process is killed on the
    way out if it is still running.

    Raises (``__init__``):
      ValueError: for a model other than the plain UNet, or without torch and diffusers.
    """

    def __init__(self, config: Any, batch_size: int, warmup: int = 1):
        self._request = _reference_request(config, batch_size, 0, warmup)
        self._process: subprocess.Popen | None = None
        self._stderr: Any = None

    def __enter__(self) -> "DiffusersReference":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._stderr is not None:
            self._stderr.close()

    def start(self) -> None:
        """Starts the process and waits until it has made its untimed calls.

        Raises:
          RuntimeError: when the process fails (with its stderr).
        """
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed on exit)
        self._process = subprocess.Popen(
            [sys.executable, _REFERENCE_SCRIPT, json.dumps(self._request)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        try:
            self._read("ready")
        except BaseException:
            self.__exit__()
            raise

    def _read(self, key: str) -> dict[str, Any]:
        """The next JSON message of the process, which must hold ``key``."""
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"The diffusers reference failed:\n{self._stderr.read()[-3000:]}")
        message = json.loads(line)
        if key not in message:
            raise RuntimeError(f"The diffusers reference sent {line.strip()!r}, not {key!r}.")
        return message

    def _send(self, command: str) -> None:
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()

    def time_call(self) -> float:
        """Runs one timed forward in the reference process; returns its seconds."""
        self._send("run")
        return float(self._read("seconds")["seconds"])

    def finish(self) -> dict[str, Any]:
        """Ends the process; returns its record over the calls made."""
        self._send("done")
        record = self._read("median_s")
        self._process.wait()
        return record


def _device_peak(device: jax.Device) -> tuple[int, str] | None:
    """The device allocator's peak, where the backend reports one (accelerators)."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return None


def _flops_per_device(compiled: jax.stages.Compiled) -> tuple[float | None, int]:
    """XLA's FLOP count of one device's share of a compiled program, and the device count.

    ``cost_analysis()`` describes the one SPMD-partitioned module each device runs: its
    FLOPs are per device (measured on CPU: ``x @ w`` with ``x[64, 256]`` sharded by rows
    reports 8.4 MFLOP on 1 device, 4.2 on 2, 1.05 on 8). The devices are those of the
    program's input and output shardings.
    """
    shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
    num_devices = len({d for s in shardings for d in s.device_set}) or 1
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort: some backends do not report it
        flops = None
    return flops, num_devices


def run_benchmark(
    config: Any,
    what: str,
    batch_size: int,
    steps: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    devices: Sequence[jax.Device] | None = None,
    between: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Compiles, warms up and times the program on ``devices`` (default: all).

    Args:
      between: called after each timed call, outside its timing (e.g.
        ``DiffusersReference.time_call``, to alternate the reference's calls with ours).

    Returns:
      The result record (see the module docstring).
    """
    config = specs.as_run_spec(config)
    fn, args_fn, run = _program(config, what, batch_size, steps, devices)
    state_bytes = state_bytes_per_device(args_fn()[0])  # before the step donates it
    t0 = time.perf_counter()
    compiled = fn.lower(*args_fn()).compile()
    jax.block_until_ready(run(compiled))
    compile_s = time.perf_counter() - t0
    flops, num_devices = _flops_per_device(compiled)
    for _ in range(warmup):
        jax.block_until_ready(run(compiled))
    times = []
    with process_memory.phase_peak() as rss:  # the timed calls' own peak RSS
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(compiled))
            times.append(time.perf_counter() - t0)
            if between is not None:
                between()
    median = statistics.median(times)
    device = (list(devices) if devices else jax.devices())[0]
    peak, peak_source = _device_peak(device) or (rss.process_bytes, rss.source)
    run_peak = rss.phase_bytes if peak_source == rss.source else None
    record = {
        "what": what,
        "model": config.model.name,
        "batch_size": batch_size,
        "median_s": median,
        "min_s": min(times),
        "times_s": times,
        "items_per_s": batch_size / median,
        "first_call_s": compile_s,
        "repeats": repeats,
        "device": f"{device.platform}:{device.device_kind} x{num_devices}",
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
        "run_peak_memory_bytes": run_peak,
        "flops_per_device": flops,
        "flops_per_item": flops * num_devices / batch_size if flops else None,
        "state_bytes_per_device": state_bytes,
    }
    peak_flops = next((v for k, v in _PEAK_FLOPS.items() if k in device.device_kind), None)
    if flops and peak_flops:
        record["mfu"] = flops / median / peak_flops
    return record


def plan(
    config: Any,
    batch_size: int,
    devices: Sequence[jax.Device] | None = None,
    compile_step: bool = True,
) -> dict[str, Any]:
    """Compiles, without running, the train step on the configured mesh of ``devices``.

    The train state is abstract (``jax.eval_shape`` shapes with their shardings): nothing
    of the model is allocated, so the plan for a model too large for this host works.

    Args:
      config: the full config (``model``, ``optim``, ``sharding.mesh_shape`` and
        ``mesh_axes``).
      batch_size: the global batch.
      devices: the mesh's devices (default: all).
      compile_step: False: only the state's layout (``state_bytes_per_device``), in
        seconds; the compiled program's fields are left out.

    Returns:
      The plan record (see the module docstring).
    """
    config = specs.as_run_spec(config)
    mesh = sharding.create_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes, devices)
    rng = jax.random.key(config.seed)
    # The shapes and shardings ``state.create_train_state`` gives the state it allocates.
    abstract = jax.eval_shape(lambda r: state_lib.init_train_state(config, r), rng)
    shardings = state_lib.state_shardings(config, mesh, abstract)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    m = config.model
    # A UNet's size is its unet_config; embed_dim and depth are the U-ViT's.
    size = (
        {"unet_config": m.unet_config}
        if m.name in UNET_NAMES
        else {"embed_dim": m.embed_dim, "depth": m.depth}
    )
    record = {
        "what": "plan",
        "model": m.name,
        **size,
        "num_params": models.count_params(state.params),
        "dtype": m.dtype,
        "batch_size": batch_size,
        "devices": mesh.size,
        "mesh_shape": dict(mesh.shape),
        "state_bytes_per_device": state_bytes_per_device(state),
    }
    if not compile_step:
        return record
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        name: jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=batch_sharding)
        for name, b in batch_shapes(config, batch_size).items()
    }
    empty = np.zeros((m.num_clip_token, m.clip_dim), np.float32)
    fn = step_lib.jit_train_step(config, mesh, shardings, state.params, empty)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    record.update(
        temp_bytes_per_device=int(memory.temp_size_in_bytes),
        argument_bytes_per_device=int(memory.argument_size_in_bytes),
        output_bytes_per_device=int(memory.output_size_in_bytes),
        alias_bytes_per_device=int(memory.alias_size_in_bytes),
        peak_bytes_per_device=int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        ),
        flops_per_device=_flops_per_device(compiled)[0],
        collectives=count_collectives(compiled.as_text()),
        compile_s=compile_s,
    )
    return record


def use_fake_cpu_devices(count: int) -> None:
    """Makes JAX run on ``count`` CPU devices (for ``plan``), before its backends exist.

    Args:
      count: the device count (≥ 1).

    Raises:
      ValueError: for a count below 1.
      RuntimeError: when JAX's backends were already initialised (call it first thing).
    """
    if count < 1:
        raise ValueError(f"--devices={count}: give a positive device count.")
    try:
        # JAX refuses both once its backends exist (there is no public query for that).
        jax.config.update("jax_num_cpu_devices", count)
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError as e:
        raise RuntimeError(
            f"Cannot create {count} fake CPU devices: JAX's backends are already initialised. "
            "Call use_fake_cpu_devices before anything touches a JAX device (run "
            "python -m pdm_jax.benchmark --what=plan in a fresh process)."
        ) from e


def _define_flags() -> dict[str, flags.FlagHolder]:
    """The command-line flags, defined only when run as a program: importing this module
    (e.g. beside ``pdm_jax.data.coco.prepare``, which has its own ``--batch_size``) adds none.
    """
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True),
        "what": flags.DEFINE_enum(
            "what",
            "train_step",
            ["train_step", "denoise", "sample", "plan"],
            "What to time, or plan: compile the train step without running it.",
        ),
        "devices": flags.DEFINE_integer(
            "devices",
            None,
            "plan only: compile for this many fake CPU devices (default: the devices JAX sees).",
        ),
        "batch_size": flags.DEFINE_integer("batch_size", 8, "Global batch size."),
        "steps": flags.DEFINE_integer(
            "steps", None, "Sampler steps (default: config.sampler.steps)."
        ),
        "compile": flags.DEFINE_boolean(
            "compile",
            True,
            "plan only: --nocompile reports the state's layout alone (seconds, not minutes).",
        ),
        "repeats": flags.DEFINE_integer("repeats", 5, "Timed repeats after the warm-up."),
        "warmup": flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation."),
        "reference": flags.DEFINE_enum(
            "reference",
            "none",
            list(REFERENCES),
            "denoise of a plain unet only: also time diffusers' PyTorch UNet on the same shapes.",
        ),
    }


def main(argv: list[str], defined: dict[str, flags.FlagHolder]) -> None:
    """Runs the benchmark (or the plan) the flags describe and prints its JSON record."""
    del argv
    values = {name: holder.value for name, holder in defined.items()}
    num_devices, compile_step = values.pop("devices"), values.pop("compile")
    reference = values.pop("reference")
    if reference != "none" and (
        values["what"] != "denoise" or values["config"].model.name != "unet"
    ):
        raise app.UsageError(
            "--reference=diffusers times diffusers' UNet forward: it needs --what=denoise and a "
            "plain UNet config (configs/pdm.py:unet,sd=1)."
        )
    if values["what"] == "plan":
        if num_devices is not None:
            use_fake_cpu_devices(num_devices)
        record = plan(values["config"], values["batch_size"], compile_step=compile_step)
    else:
        if num_devices is not None or not compile_step:
            raise app.UsageError("--devices and --nocompile are for --what=plan only.")
        sharding.setup_cpu_devices(values["config"], values["batch_size"])
        if reference == "diffusers":
            # Started first: its set-up overlaps our compilation, its timed calls alternate
            # with ours.
            with DiffusersReference(
                values["config"], values["batch_size"], values["warmup"]
            ) as ref:
                record = run_benchmark(**values, between=ref.time_call)
                record = with_reference(record, ref.finish())
        else:
            record = run_benchmark(**values)
    print(json.dumps(record))


def with_reference(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the reference's figures and our/its time and memory ratios.

    ``memory_ratio`` compares the peaks over the timed calls (both processes reset their
    peak RSS after the warm-up) where both have one, else the processes' whole peaks;
    ``process_memory_ratio`` always compares the whole peaks (set-up and compilation in).
    """
    ours, theirs = record.get("run_peak_memory_bytes"), reference.get("run_peak_memory_bytes")
    whole = record["peak_memory_bytes"] / reference["peak_memory_bytes"]
    pairs = [a / b for a, b in zip(record["times_s"], reference["times_s"], strict=False)]
    return {
        **record,
        "reference": reference,
        "time_ratio": record["median_s"] / reference["median_s"],
        "paired_time_ratio": statistics.median(pairs) if pairs else None,
        "memory_ratio": ours / theirs if ours and theirs else whole,
        "process_memory_ratio": whole,
    }


if __name__ == "__main__":
    app.run(functools.partial(main, defined=_define_flags()))
