"""The one sampler: parameters resident on a mesh, one compiled program per spec.

Sample mode, the trainer's sample grids, the demo's figures, evaluation and the benchmark
all sample through :class:`Sampler`, so the same seed gives the same sample everywhere:

* the parameters are placed on the mesh once, laid out like the train state's (FSDP over
  ``fsdp``, heads and MLP hidden over ``tensor``: ``param_shardings``; ``set_params``
  swaps them, a no-op when they are already placed so, as the trainer's EMA parameters
  are);
* a batch is padded to a multiple of the mesh's batch shards (``data`` × ``fsdp``) and
  split over them; each example is solved independently from ``jax.random.key(seed)``,
  so a sample depends neither on the batching nor on the mesh;
* compiled programs are cached per :class:`ProgramSpec` (model, diffusion, solver, task,
  category table and mesh: all hashable), so every caller in a process shares them.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pdm_jax import models, runtime, sharding
from pdm_jax.data.schema import DatasetInfo
from pdm_jax.diffusion import analog_bits
from pdm_jax.diffusion.reverse import (
    check_task,
    from_data_prediction,
    sample_pdm,
    to_data_prediction,
)
from pdm_jax.diffusion.spec import DiffusionSpec
from pdm_jax.models.handle import param_shardings
from pdm_jax.models.spec import ModelSpec
from pdm_jax.specs import RunSpec, SamplerSpec


@dataclasses.dataclass(frozen=True)
class Samples:
    """Samples of a batch (host arrays).

    Attributes:
      latents: float32 [B, S, S, C].
      images: uint8 [B, H, W, 3] (``DatasetInfo.decode_latents``), None if not decoded.
      maps: int32 [B, fS, fS] category ids, None for a U-ViT.
      num_invalid: int [B] map pixels that decoded outside the category table, or None.
    """

    latents: np.ndarray
    images: np.ndarray | None
    maps: np.ndarray | None
    num_invalid: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """What one compiled sampling program depends on (hashable: the cache key)."""

    model: ModelSpec
    diffusion: DiffusionSpec
    sampler: SamplerSpec
    task: str
    valid_ids: tuple[int, ...]
    mesh: Mesh
    known: tuple[bool, bool, bool, bool]  # which of known_x, known_m, mask_x, mask_m are given


def clipped_denoiser(denoise, schedule, bound: float, has_map: bool, image_prediction: str = "eps"):
    """Wraps a denoiser so that its image data prediction lies in ``[-bound, bound]``.

    ``x̂_0 = (x_t − σ_t ε̂)/α_t`` (or ``α_t x_t − σ_t v̂``) is clipped and turned back into
    ``ε̂' = (x_t − α_t clip(x̂_0))/σ_t`` (or ``v̂' = (α_t x_t − clip(x̂_0))/σ_t``; DDPM's
    ``clip_denoised``): for bounded latents such as the synthetic world's pixels, it keeps
    an imperfect model's early, noisy predictions (amplified by σ/α ≈ 15 at t = 1) from
    leaving the data range.

    Args:
      denoise: ``(params, x_t, m_t, t_model, context)`` → ε̂ or ``(ε̂, M̂_0)``.
      schedule: the sampling schedule (``t_model = t · N``).
      bound: the clip value.
      has_map: whether ``denoise`` returns a map prediction too.
      image_prediction: the network's image output: ``"eps"``, ``"v"`` or ``"x0"``.

    Returns:
      A denoiser with the same signature and outputs.
    """

    def wrapped(params, x_t, m_t, t_model, context):
        out = denoise(params, x_t, m_t, t_model, context)
        img = out[0] if has_map else out
        t = (t_model / schedule.num_timesteps).reshape(-1, *(1,) * (x_t.ndim - 1))
        alpha, sigma = schedule.marginal_alpha(t), schedule.marginal_std(t)
        x0 = to_data_prediction(img, x_t, alpha, sigma, image_prediction)
        x0 = jnp.clip(x0, -bound, bound)
        clipped = from_data_prediction(x0, x_t, alpha, sigma, image_prediction).astype(img.dtype)
        return (clipped, *out[1:]) if has_map else clipped

    return wrapped


def sample_fn(model: ModelSpec, diffusion: DiffusionSpec, sampler: SamplerSpec, task: str):
    """``sample_pdm`` bound to the network, schedule, shapes and solver (not jitted).

    Args:
      model, diffusion, sampler: the run's specs (``sampler.clip_x0`` > 0 clips x̂₀).
      task: one of ``diffusion.reverse.TASKS``.

    Returns:
      ``(params, rng, context [B,T,D], empty_context [T,D], **known/masks) -> {"x", "m"?}``.
    """
    schedule = diffusion.schedule()
    denoise = models.denoise_fn(model)
    if sampler.clip_x0 > 0:
        denoise = clipped_denoiser(
            denoise, schedule, sampler.clip_x0, model.has_map, diffusion.image_prediction
        )
    s = model.img_size
    return functools.partial(
        sample_pdm,
        denoise,
        schedule=schedule,
        image_shape=(s, s, model.in_chans),
        map_shape=(model.map_size, model.map_size, model.num_bits) if model.has_map else None,
        options=sampler.options(),
        map_noise_std=diffusion.map_noise_std,
        image_prediction=diffusion.image_prediction,
        task=task,
    )


@functools.lru_cache(maxsize=32)
def program(spec: ProgramSpec):
    """The jitted, per-example-seeded program of ``spec`` (batch split over the mesh).

    Its arguments: ``(params, seeds [B] uint32, contexts [B,T,D], empty_context [T,D],
    known_x, known_m (ids), mask_x, mask_m)`` (the last four None unless ``spec.known``
    says given); it returns ``{"x", "ids"?, "invalid"?}`` replicated on the mesh.
    """
    fn = sample_fn(spec.model, spec.diffusion, spec.sampler, spec.task)
    valid_ids = np.asarray(spec.valid_ids, np.int64)
    num_bits, has_map = spec.model.num_bits, spec.model.has_map

    def one(params, seed, context, empty, known_x, known_m, mask_x, mask_m):
        add = lambda a: None if a is None else a[None]
        if known_m is not None:
            known_m = analog_bits.ids_to_bits(known_m, num_bits)
        res = fn(
            params,
            jax.random.key(seed),
            context[None],
            empty,
            known_x=add(known_x),
            known_m=add(known_m),
            mask_x=add(mask_x),
            mask_m=add(mask_m),
        )
        out = {"x": res["x"][0]}
        if has_map:
            out["ids"], out["invalid"] = analog_bits.decode_map(res["m"][0], valid_ids, num_bits)
        return out

    batch = sharding.batch_sharding(spec.mesh)
    given = lambda flag: batch if flag else None
    # The examples (the vmapped axis) are split over data × fsdp; inside, the activation
    # rules use the other axes only (heads and MLP hidden over tensor).
    batch_axes = sharding.batch_axes(spec.mesh)
    jitted = jax.jit(
        jax.vmap(one, in_axes=(None, 0, 0, None, 0, 0, 0, 0), spmd_axis_name=batch_axes),
        in_shardings=(
            param_shardings(spec.model, spec.mesh),
            batch,
            batch,
            sharding.replicated(spec.mesh),
            *(given(flag) for flag in spec.known),
        ),
        out_shardings=sharding.replicated(spec.mesh),
        compiler_options=runtime.inference_compiler_options(spec.mesh),
    )
    return sharding.MeshProgram(jitted, spec.mesh, exclude=batch_axes)


class Sampler:
    """Samples a model's batches on a mesh with resident parameters (module docstring)."""

    def __init__(
        self,
        model: ModelSpec,
        diffusion: DiffusionSpec,
        sampler: SamplerSpec,
        info: DatasetInfo,
        params: Any,
        *,
        mesh: Mesh | None = None,
        batch_size: int = 16,
    ):
        """Args:
        model, diffusion, sampler: the run's specs.
        info: the dataset's codecs (text encoder, latent decoder) and category table.
        params: the parameters to sample with (EMA ones, usually).
        mesh: devices to sample on, batch split over its data × fsdp axes (default: this
          process's devices on the ``data`` axis; ``sharding.local_mesh`` gives the
          configured mesh on them).
        batch_size: examples per compiled call, rounded up to a multiple of the mesh's
          batch shards (shorter batches are padded).
        """
        self.model, self.diffusion, self.sampler, self.info = model, diffusion, sampler, info
        self.mesh = mesh or sharding.local_mesh()
        shards = sharding.batch_shards(self.mesh)
        self.batch_size = -(-int(batch_size) // shards) * shards
        self.valid_ids = tuple(sorted(int(i) for i in info.category_names))
        self.params = None
        self.set_params(params)

    @classmethod
    def for_run(
        cls,
        run: RunSpec,
        info: DatasetInfo,
        params: Any,
        *,
        batch_size: int,
        mesh: Mesh | None = None,
    ) -> "Sampler":
        """The sampler of a run: its model, diffusion and sampler specs.

        Args:
          run: the run's spec.
          info: the dataset's codecs and category table.
          params: the parameters to sample with.
          batch_size: examples per compiled call (see ``__init__``).
          mesh: devices to sample on; default: the configured mesh
            (``sharding.mesh_shape`` / ``mesh_axes``) on this process's devices.

        Returns:
          The sampler.
        """
        if mesh is None:
            mesh = sharding.local_mesh(run.sharding.mesh_shape, run.sharding.mesh_axes)
        return cls(
            run.model, run.diffusion, run.sampler, info, params, mesh=mesh, batch_size=batch_size
        )

    def set_params(self, params: Any) -> None:
        """Places ``params`` on the mesh (``param_shardings``; no copy when already so)."""
        self.params = jax.device_put(params, param_shardings(self.model, self.mesh))

    def _place(self, a: np.ndarray, where: jax.sharding.NamedSharding) -> Any:
        """A host array as the program's input.

        One process: as is. Several: jit takes no numpy input with a non-trivial sharding,
        so a ``jax.Array``, built from the full array (the same on every process for a mesh
        that spans them, as the trainer's: all call the sampler with the same inputs).
        """
        if jax.process_count() == 1:
            return a
        return jax.make_array_from_callback(a.shape, where, lambda index: a[index])

    @property
    def map_side(self) -> int:
        """The model's map side f·S (0 for a U-ViT)."""
        return self.model.map_size

    def __call__(
        self,
        seeds: Sequence[int],
        *,
        captions: Sequence[str] | None = None,
        contexts: np.ndarray | None = None,
        task: str | None = None,
        known_latents: np.ndarray | None = None,
        known_maps: np.ndarray | None = None,
        mask_x: np.ndarray | None = None,
        mask_m: np.ndarray | None = None,
        decode_images: bool = True,
    ) -> Samples:
        """Samples one example per seed.

        Args:
          seeds: B seeds (example i starts from ``jax.random.key(seeds[i])``).
          captions: B captions (encoded with ``info.encode_text``), or
          contexts: float [B, T, D] text contexts.
          task: one of ``TASKS`` (default ``sampler.task``).
          known_latents: float [B, S, S, C] clean latents (given_image, inpaint).
          known_maps: int [B, fS, fS] ids (given_map, inpaint).
          mask_x, mask_m: inpainting masks [B, S, S, 1] / [B, fS, fS, 1], 1 = known.
          decode_images: decode the latents to images with ``info.decode_latents``.

        Returns:
          The ``Samples``.
        """
        task = task or self.sampler.task
        check_task(task, self.model.has_map, self.model.name)
        if (captions is None) == (contexts is None):
            raise ValueError("Pass either captions or contexts.")
        n = len(seeds)
        if contexts is None:
            contexts = self.info.encode_text(list(captions))
        if len(contexts) != n:
            raise ValueError(f"Got {len(contexts)} captions/contexts but {n} seeds.")
        arrays = dict(
            seeds=np.asarray(seeds, np.uint32),
            contexts=np.asarray(contexts, np.float32),
            known_x=None if known_latents is None else np.asarray(known_latents, np.float32),
            known_m=None if known_maps is None else np.asarray(known_maps, np.int32),
            mask_x=None if mask_x is None else np.asarray(mask_x, np.float32),
            mask_m=None if mask_m is None else np.asarray(mask_m, np.float32),
        )
        spec = ProgramSpec(
            self.model,
            self.diffusion,
            self.sampler,
            task,
            self.valid_ids,
            self.mesh,
            tuple(arrays[k] is not None for k in ("known_x", "known_m", "mask_x", "mask_m")),
        )
        compiled = program(spec)
        batch, replicated = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        empty = self._place(np.asarray(self.info.empty_context, np.float32), replicated)
        parts = []
        for lo in range(0, n, self.batch_size):
            chunk = {
                k: None
                if a is None
                else self._place(_pad(a[lo : lo + self.batch_size], self.batch_size), batch)
                for k, a in arrays.items()
            }
            out = compiled(
                self.params,
                chunk["seeds"],
                chunk["contexts"],
                empty,
                chunk["known_x"],
                chunk["known_m"],
                chunk["mask_x"],
                chunk["mask_m"],
            )
            parts.append({k: np.asarray(v)[: min(self.batch_size, n - lo)] for k, v in out.items()})
        cat = lambda k: np.concatenate([p[k] for p in parts]) if k in parts[0] else None
        latents = cat("x")
        maps = cat("ids")
        return Samples(
            latents=latents,
            images=self.info.decode_latents(latents) if decode_images else None,
            maps=None if maps is None else maps.astype(np.int32),
            num_invalid=cat("invalid"),
        )


def host_indices(num_samples: int, process_index: int, process_count: int) -> range:
    """The contiguous slice of ``range(num_samples)`` that one process samples.

    Args:
      num_samples: samples in all.
      process_index: this process (``jax.process_index()``).
      process_count: processes (``jax.process_count()``).

    Returns:
      The slice's indices; the slices of all processes partition ``range(num_samples)``
      in order, their sizes differ by at most one.
    """
    bounds = np.linspace(0, num_samples, process_count + 1).round().astype(int)
    return range(int(bounds[process_index]), int(bounds[process_index + 1]))


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with its last row repeated up to ``size`` rows."""
    pad = size - len(a)
    return np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a
