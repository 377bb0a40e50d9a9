"""The model handle (``models.handle``) and image-stream surgery (``models.image_stream``)."""

import jax
from flax import traverse_util
from jax.sharding import NamedSharding

from configs.pdm import get_config
from pdm_jax import models, sharding, specs
from pdm_jax.models import handle as handle_lib
from pdm_jax.models import image_stream


def _spec(name):
    return specs.from_config(get_config(f"{name},tiny=1")).model


def test_the_handle_agrees_with_the_model_builders():
    spec = _spec("two_stream")
    h = handle_lib.handle(spec)
    assert handle_lib.handle(spec) is h  # one per spec
    assert type(h.module) is type(models.build(spec))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), h.abstract_params) == jax.tree.map(
        lambda a: (a.shape, a.dtype), models.abstract_params(spec)
    )
    assert h.logical_axes == models.param_logical_axes(spec)
    mesh = sharding.create_mesh((1, -1, 1), sharding.MESH_AXES, jax.devices())
    placed = h.shardings(mesh)
    assert placed is handle_lib.param_shardings(spec, mesh)
    leaves = jax.tree.leaves(placed, is_leaf=lambda x: isinstance(x, NamedSharding))
    assert len(leaves) == len(jax.tree.leaves(h.abstract_params))
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in leaves)


def test_the_image_stream_is_a_plain_uvits_parameters():
    pdm = models.abstract_params(_spec("two_stream"))
    uvit = models.abstract_params(_spec("uvit"))
    mask = traverse_util.flatten_dict(image_stream.image_stream_mask(pdm))
    assert {p[0] for p, frozen in mask.items() if frozen} == set(uvit)
    assert all(image_stream.is_image_stream(k) for k in uvit)
    merged = image_stream.merge_image_stream(pdm, uvit)
    assert all(merged[k] is uvit[k] for k in uvit)
    # The package's names are these functions.
    assert models.merge_image_stream is image_stream.merge_image_stream
