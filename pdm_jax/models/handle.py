"""A model's handle: its Linen module, abstract parameters, logical axes and shardings.

Everything that lays out a model's parameters (the train state, the sampler, the
benchmark) reads them here, from the one ``ModelSpec``::

    h = handle(config.model)
    h.module                 # the unbound Linen module
    h.abstract_params        # jax.ShapeDtypeStruct leaves, nothing allocated
    h.logical_axes           # PartitionSpec leaves of logical axis names
    h.shardings(mesh)        # NamedSharding leaves: where each parameter lives on mesh
"""

import dataclasses
import functools
from typing import Any

from flax import linen as nn
from jax.sharding import Mesh

from pdm_jax import models, sharding
from pdm_jax.models.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class ModelHandle:
    """What a model spec implies for its parameters, each computed once on first use.

    Attributes:
      spec: the model spec (hashable: handles of equal specs are equal).
    """

    spec: ModelSpec

    @functools.cached_property
    def module(self) -> nn.Module:
        """The unbound Linen module (``models.build``)."""
        return models.build(self.spec)

    @functools.cached_property
    def _boxed(self) -> Any:
        """The initialiser's output shapes with their ``nn.LogicallyPartitioned`` boxes."""
        return models.abstract_boxed_params(self.spec)

    @functools.cached_property
    def abstract_params(self) -> Any:
        """Parameter shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), nothing allocated."""
        return nn.meta.unbox(self._boxed)

    @functools.cached_property
    def logical_axes(self) -> Any:
        """Tree like the parameters of ``PartitionSpec`` leaves holding logical axis names
        (e.g. ``PartitionSpec('embed', 'mlp')``), from the models' annotations."""
        return nn.get_partition_spec(self._boxed)

    def shardings(self, mesh: Mesh) -> Any:
        """Where each parameter lives on ``mesh`` (``param_shardings``)."""
        return param_shardings(self.spec, mesh)


@functools.lru_cache(maxsize=16)
def handle(spec: ModelSpec) -> ModelHandle:
    """The handle of ``spec``, shared by every caller in the process (cached per spec)."""
    return ModelHandle(spec)


@functools.lru_cache(maxsize=16)
def param_shardings(model: ModelSpec, mesh: Mesh) -> Any:
    """Where each parameter of ``model`` lives on ``mesh``: its logical axes under the rules.

    Cached per (model, mesh): the sampler places its parameters with it at every swap.

    Args:
      model: the model spec (its partitioning annotations name each dimension).
      mesh: the device mesh.

    Returns:
      Tree like the parameters with ``NamedSharding`` leaves (``sharding.named_shardings``:
      dimensions their mesh axes do not divide are replicated).
    """
    h = handle(model)
    return sharding.named_shardings(h.logical_axes, h.abstract_params, mesh)
