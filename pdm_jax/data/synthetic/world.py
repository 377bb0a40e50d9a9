"""The synthetic world: category table, scene sampling, captions and rendering.

A scene is a two-region "stuff" background (a top category over a bottom category, split
at a random horizon) with 1–3 "things" of distinct categories, each in its own cell of a
3×3 grid (``top-left`` … ``bottom-right``) and either ``small`` or ``big``. Every category
has its own saturated colour and a faint texture, so an image can be segmented back into
a category map by colour (the oracle, :mod:`pdm_jax.data.synthetic.oracle`).

Ids follow the COCO panoptic convention: things < 92 ≤ stuff, ``0`` = void. Void is never
rendered (every pixel belongs to a stuff or a thing category) and the oracle never returns
it; it is in the table because decoded maps report ids outside the table as void.

Everything here is pure numpy and deterministic: a :class:`Scene` holds every random
draw, so ``render_image(scene, ...)`` and ``render_map(scene, ...)`` need no generator.
"""

import dataclasses
import functools
import re

import numpy as np

VOID_ID = 0


@dataclasses.dataclass(frozen=True)
class Category:
    """One row of the category table."""

    id: int
    name: str
    isthing: bool
    colour: tuple[int, int, int]  # RGB, uint8 range
    colour_name: str


CATEGORIES: tuple[Category, ...] = (
    Category(VOID_ID, "void", False, (0, 0, 0), "black"),
    Category(19, "tent", True, (245, 235, 20), "yellow"),
    Category(37, "ball", True, (225, 25, 35), "red"),
    Category(62, "box", True, (250, 135, 0), "orange"),
    Category(85, "cross", True, (200, 40, 210), "magenta"),
    Category(154, "sand", False, (225, 195, 120), "tan"),
    Category(155, "sea", False, (15, 55, 160), "navy"),
    Category(159, "snow", False, (245, 245, 245), "white"),
    Category(187, "sky", False, (120, 185, 250), "light blue"),
    Category(193, "grass", False, (40, 165, 45), "green"),
    Category(199, "wall", False, (135, 120, 135), "grey"),
)
CATEGORY_BY_ID: dict[int, Category] = {c.id: c for c in CATEGORIES}
CATEGORY_BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
CATEGORY_NAMES: dict[int, str] = {c.id: c.name for c in CATEGORIES}
THING_IDS: tuple[int, ...] = tuple(c.id for c in CATEGORIES if c.isthing)
STUFF_IDS: tuple[int, ...] = tuple(c.id for c in CATEGORIES if c.id != VOID_ID and not c.isthing)
TOP_STUFF_IDS: tuple[int, ...] = (187, 199)  # sky, wall
BOTTOM_STUFF_IDS: tuple[int, ...] = (193, 155, 154, 159)  # grass, sea, sand, snow

# Caption words of the 3×3 grid cells, [row][col].
POSITION_WORDS: tuple[tuple[str, ...], ...] = (
    ("top-left", "top", "top-right"),
    ("left", "centre", "right"),
    ("bottom-left", "bottom", "bottom-right"),
)
SIZE_WORDS: tuple[str, str] = ("small", "big")
SIZE_RADII: tuple[tuple[float, float], ...] = ((0.11, 0.13), (0.14, 0.165))  # fraction of side
CAPTION_WORDS: tuple[str, ...] = (
    *SIZE_WORDS,
    *(CATEGORY_BY_ID[i].name for i in THING_IDS),
    *(w for row in POSITION_WORDS for w in row),
    "and",
    "over",
    *(CATEGORY_BY_ID[i].name for i in STUFF_IDS),
)

# (thing pair, top stuff, bottom stuff) never generated for training; kept for evaluation.
# Every pair and every background still occurs in training, only not together.
HELD_OUT_COMPOSITIONS: tuple[tuple[frozenset[int], int, int], ...] = (
    (frozenset({37, 62}), 187, 155),  # ball + box, sky over sea
    (frozenset({37, 19}), 199, 193),  # ball + tent, wall over grass
    (frozenset({37, 85}), 187, 159),  # ball + cross, sky over snow
    (frozenset({62, 19}), 187, 154),  # box + tent, sky over sand
    (frozenset({62, 85}), 199, 155),  # box + cross, wall over sea
    (frozenset({19, 85}), 187, 193),  # tent + cross, sky over grass
)


@dataclasses.dataclass(frozen=True)
class Thing:
    """One object of a scene; geometry in fractions of the image side."""

    category_id: int
    row: int  # grid row, 0 = top
    col: int  # grid column, 0 = left
    big: bool
    cx: float
    cy: float
    radius: float
    colour_shift: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class Scene:
    """Every random draw of one example: rendering it needs no generator."""

    top_id: int
    bottom_id: int
    horizon: float  # fraction of the height where the bottom stuff starts
    things: tuple[Thing, ...]  # reading order (row-major grid cells)
    top_shift: tuple[float, float, float]
    bottom_shift: tuple[float, float, float]
    texture_phase: float
    noise_seed: int

    @property
    def category_ids(self) -> tuple[int, ...]:
        """Ids the scene shows: its things in reading order, then the top and bottom stuff."""
        return (*(t.category_id for t in self.things), self.top_id, self.bottom_id)


def is_held_out(thing_ids: tuple[int, ...], top_id: int, bottom_id: int) -> bool:
    """Whether a composition contains a held-out (thing pair, background) combination.

    Args:
      thing_ids: category ids of the scene's things.
      top_id: the top stuff id.
      bottom_id: the bottom stuff id.

    Returns:
      True if some held-out pair is among the things on its held-out background.
    """
    present = set(thing_ids)
    return any(
        pair <= present and top == top_id and bottom == bottom_id
        for pair, top, bottom in HELD_OUT_COMPOSITIONS
    )


def sample_scene(
    rng: np.random.Generator,
    *,
    max_things: int = 3,
    colour_jitter: float = 10.0,
    held_out: bool = False,
    composition: int = 0,
) -> Scene:
    """Draws one scene.

    Args:
      rng: the generator to draw from (seeded per example by the caller).
      max_things: at most this many things (1..4, distinct categories); at least one.
      colour_jitter: per-channel uniform colour offset of each region, uint8 units.
      held_out: draw a held-out composition (number ``composition`` of
        ``HELD_OUT_COMPOSITIONS``) instead of a training one.
      composition: which held-out composition, taken modulo their number.

    Returns:
      The scene. Training scenes never contain a held-out composition.
    """
    num_kinds = len(THING_IDS)
    if not 1 <= max_things <= num_kinds:
        raise ValueError(f"max_things={max_things} must be in 1..{num_kinds} (distinct things).")
    if held_out:
        if max_things < 2:
            raise ValueError("Held-out compositions have two things: use max_things >= 2.")
        pair, top_id, bottom_id = HELD_OUT_COMPOSITIONS[composition % len(HELD_OUT_COMPOSITIONS)]
        others = [i for i in THING_IDS if i not in pair]
        extra = int(rng.integers(0, max_things - 1))
        thing_ids = (*sorted(pair), *(others[i] for i in rng.permutation(len(others))[:extra]))
    else:
        while True:
            count, top, bottom = rng.integers(
                (1, 0, 0), (max_things + 1, len(TOP_STUFF_IDS), len(BOTTOM_STUFF_IDS))
            ).tolist()
            thing_ids = tuple(THING_IDS[i] for i in rng.permutation(num_kinds)[:count])
            top_id, bottom_id = TOP_STUFF_IDS[top], BOTTOM_STUFF_IDS[bottom]
            if not is_held_out(thing_ids, top_id, bottom_id):
                break
    cells = rng.permutation(9)[: len(thing_ids)].tolist()
    draws = rng.random((len(thing_ids), 7)).tolist()  # size, radius, jitter ×2, colour ×3
    things = []
    for category_id, cell, u in zip(thing_ids, cells, draws, strict=True):
        row, col = divmod(cell, 3)
        big = u[0] < 0.5
        lo, hi = SIZE_RADII[int(big)]
        radius = lo + (hi - lo) * u[1]
        # Stay inside the grid cell so things never overlap.
        slack = max(1.0 / 6.0 - radius, 0.0)
        cx = (col + 0.5) / 3.0 + slack * (2.0 * u[2] - 1.0)
        cy = (row + 0.5) / 3.0 + slack * (2.0 * u[3] - 1.0)
        shift = tuple(colour_jitter * (2.0 * v - 1.0) for v in u[4:])
        things.append(Thing(category_id, row, col, big, cx, cy, radius, shift))
    things.sort(key=lambda t: (t.row, t.col))
    u = rng.random(8).tolist()  # horizon, phase, top colour ×3, bottom colour ×3
    return Scene(
        top_id=top_id,
        bottom_id=bottom_id,
        horizon=0.35 + 0.3 * u[0],
        things=tuple(things),
        top_shift=tuple(colour_jitter * (2.0 * v - 1.0) for v in u[2:5]),
        bottom_shift=tuple(colour_jitter * (2.0 * v - 1.0) for v in u[5:8]),
        texture_phase=u[1],
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. ``"big ball top-left, small box right and small tent bottom,
    sky over sea"``: things in reading order, then the background.

    Args:
      scene: the scene to describe.

    Returns:
      The caption text (13 words at most, for three things).
    """
    phrases = [
        f"{SIZE_WORDS[int(t.big)]} {CATEGORY_BY_ID[t.category_id].name} "
        f"{POSITION_WORDS[t.row][t.col]}"
        for t in scene.things
    ]
    things = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    top, bottom = CATEGORY_BY_ID[scene.top_id].name, CATEGORY_BY_ID[scene.bottom_id].name
    return f"{things}, {top} over {bottom}"


def caption_categories(text: str) -> tuple[int, ...]:
    """Category ids a caption names (any text; words outside the table are ignored).

    Args:
      text: a caption.

    Returns:
      The named ids, each once, in order of first mention.
    """
    words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())
    ids = [CATEGORY_BY_NAME[w].id for w in words if w in CATEGORY_BY_NAME and w != "void"]
    return tuple(dict.fromkeys(ids))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: x [1, size], y [size, 1] (cached, read-only)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    c.setflags(write=False)
    return c[None, :], c[:, None]


def _window(centre: float, radius: float, size: int) -> slice:
    """Pixels whose centres may lie within ``radius`` of ``centre`` (all shapes fit)."""
    lo = int(np.floor((centre - radius) * size - 0.5))
    hi = int(np.ceil((centre + radius) * size - 0.5)) + 1
    return slice(max(lo, 0), min(max(hi, 0), size))


def _thing_mask(thing: Thing, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the thing's shape over coordinates x [1, w], y [h, 1] → [h, w]."""
    dx, dy, r = x - thing.cx, y - thing.cy, thing.radius
    name = CATEGORY_BY_ID[thing.category_id].name
    if name == "ball":
        return dx * dx + dy * dy <= r * r
    if name == "box":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if name == "tent":  # apex up at cy - r, base at cy + r
        return (dy <= r) & (np.abs(dx) <= (dy + r) * 0.5)
    if name == "cross":
        arm = 0.4 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= r) & (ay <= arm)) | ((ay <= r) & (ax <= arm))
    raise ValueError(f"No shape for category {name!r}.")


def _things(scene: Scene, size: int):
    """Yields (thing, rows, cols, mask) with the mask [rows, cols] of each thing's window."""
    x, y = _grid(size)
    for thing in scene.things:
        rows = _window(thing.cy, thing.radius, size)
        cols = _window(thing.cx, thing.radius, size)
        yield thing, rows, cols, _thing_mask(thing, x[:, cols], y[rows])


def _horizon_row(scene: Scene, size: int) -> int:
    """First row whose centre lies at or below the horizon."""
    return int(np.ceil(scene.horizon * size - 0.5))


def render_map(scene: Scene, size: int) -> np.ndarray:
    """The scene's category map, each pixel the category at its centre (nearest semantics).

    Args:
      scene: the scene.
      size: output side M.

    Returns:
      int32 [M, M] category ids.
    """
    ids = np.empty((size, size), dtype=np.int32)
    cut = _horizon_row(scene, size)
    ids[:cut], ids[cut:] = scene.top_id, scene.bottom_id
    for thing, rows, cols, mask in _things(scene, size):
        ids[rows, cols][mask] = thing.category_id
    return ids


def _texture(scene: Scene, category_id: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brightness pattern in [-1, 1] of a stuff category, a few cycles per side; [h, w]."""
    p = 2.0 * np.pi * scene.texture_phase
    name = CATEGORY_BY_ID[category_id].name
    if name == "sky":  # lighter towards the horizon
        return np.broadcast_to(2.0 * y / max(scene.horizon, 1e-3) - 1.0, (y.size, x.size))
    if name == "wall":  # bricks: dark mortar lines
        row = np.floor(y * 8.0 + scene.texture_phase)
        bx = np.mod(x * 4.0 + 0.5 * row, 1.0)
        by = np.mod(y * 8.0 + scene.texture_phase, 1.0)
        return np.where((by < 0.18) | (bx < 0.09), -1.0, 0.3)
    if name == "grass":
        return np.sin(2 * np.pi * 5.0 * x + p) * np.cos(np.pi * 3.0 * y + p)
    if name == "sea":  # waves
        return np.sin(2 * np.pi * (4.0 * y + 0.4 * np.sin(2 * np.pi * 2.0 * x + p)))
    if name == "sand":  # diagonal dunes
        return np.sin(2 * np.pi * (3.0 * x + 2.0 * y) + p)
    if name == "snow":
        return np.broadcast_to(0.5 * np.cos(2 * np.pi * (2.0 * x - y) + p), (y.size, x.size))
    raise ValueError(f"No texture for category {name!r}.")


def render_image(
    scene: Scene,
    size: int,
    *,
    grain_size: int,
    texture_amplitude: float = 14.0,
    noise_std: float = 4.0,
) -> np.ndarray:
    """Renders the scene as an RGB image.

    Pixels take the colour of the category at their centre (hard edges: anti-aliasing comes
    from area-averaging to the latent size), plus the region's colour offset, a faint
    texture (stuff) or shading lit from the top left (things), and Gaussian noise.

    Args:
      scene: the scene.
      size: output side R.
      grain_size: side of the noise grid (the latent side S, a divisor of R) so the noise
        survives the area-average to the latent.
      texture_amplitude: peak-to-peak brightness of textures and shading, uint8 units.
      noise_std: per-pixel noise std at ``grain_size`` resolution, uint8 units.

    Returns:
      uint8 [R, R, 3].
    """
    if size % grain_size:
        raise ValueError(f"Image size {size} must be a multiple of the grain size {grain_size}.")
    x, y = _grid(size)
    cut = _horizon_row(scene, size)
    colour = np.empty((size, size, 3), dtype=np.float32)
    light = np.empty((size, size), dtype=np.float32)
    colour[:cut] = np.add(CATEGORY_BY_ID[scene.top_id].colour, scene.top_shift)
    colour[cut:] = np.add(CATEGORY_BY_ID[scene.bottom_id].colour, scene.bottom_shift)
    light[:cut] = _texture(scene, scene.top_id, x, y[:cut])
    light[cut:] = _texture(scene, scene.bottom_id, x, y[cut:])
    for thing, rows, cols, mask in _things(scene, size):
        colour[rows, cols][mask] = np.add(
            CATEGORY_BY_ID[thing.category_id].colour, thing.colour_shift
        )
        shade = -((x[:, cols] - thing.cx) + (y[rows] - thing.cy)) / (2.0 * thing.radius)
        light[rows, cols][mask] = shade[mask]
    light *= 0.5 * texture_amplitude
    image = colour  # composed in place: the same sums, fewer temporaries
    image += light[..., None]
    if noise_std > 0:
        noise = np.random.default_rng(scene.noise_seed).normal(
            0.0, noise_std, (grain_size, 1, grain_size, 1, 3)
        )
        k = size // grain_size
        image.reshape(grain_size, k, grain_size, k, 3)[...] += noise.astype(np.float32)
    np.rint(image, out=image)
    return np.clip(image, 0, 255, out=image).astype(np.uint8)
