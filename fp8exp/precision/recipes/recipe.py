"""The recipes, their options and defaults, as plain Python (no jax: config checks can use it
before anything heavy loads). Which operand of which matmul each recipe quantizes how is plan.py.

    current        per-tensor scale from this step's amax (TE Float8CurrentScaling, torchao
                   tensorwise): E4M3 X and W, gradients E5M2 by default
    rowwise        one scale per row along the contraction axis for every operand, E4M3
                   everywhere, power-of-2 scales (torchao rowwise)
    rowwise_gw_hp  rowwise forward; dgrad with rowwise dY and a per-tensor W; wgrad in high
                   precision (torchao rowwise_with_gw_hp)
    block          DeepSeek-V3 / TE Float8BlockScaling: 1 x 128 tiles for activations and
                   gradients, 128 x 128 blocks for weights, E4M3 throughout, power-of-2 scales
    mxfp8          OCP MX: 32-element blocks along the contraction axis, E8M0 scales, E4M3 data
                   (TE MXFP8BlockScaling)
    nvfp4          what-if only (nvfp4.py): E2M1 data, E4M3 scale per 16 elements, FP32 per tensor
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

RECIPES = ("current", "rowwise", "rowwise_gw_hp", "block", "mxfp8", "nvfp4")
TRAINABLE = RECIPES[:-1]
GRAD_FORMATS = ("e4m3", "e5m2")

# The options each recipe takes (a config naming another one is an error), and their defaults.
OPTIONS = {
    "current": ("margin", "power_of_2_scales", "grad_format"),
    "rowwise": ("margin", "power_of_2_scales", "grad_format"),
    "rowwise_gw_hp": ("margin", "power_of_2_scales", "grad_format"),
    "block": ("margin", "power_of_2_scales", "block_size", "grad_format"),
    "mxfp8": ("block_size", "grad_format"),
    "nvfp4": (),
}
DEFAULTS = {
    "current": {"power_of_2_scales": False, "grad_format": "e5m2"},     # TE HYBRID, torchao
    "rowwise": {"power_of_2_scales": True, "grad_format": "e4m3"},      # torchao ROWWISE
    "rowwise_gw_hp": {"power_of_2_scales": True, "grad_format": "e4m3"},
    "block": {"power_of_2_scales": True, "block_size": 128, "grad_format": "e4m3"},  # TE, DeepSeek
    "mxfp8": {"power_of_2_scales": True, "block_size": 32, "grad_format": "e4m3"},   # OCP MX k=32
    "nvfp4": {"power_of_2_scales": False, "block_size": 16, "grad_format": "e4m3"},
}


@dataclass(frozen=True)
class Recipe:
    """A recipe with every option resolved; hashable, so it is a static argument of the jitted
    matmul. Build one with `make_recipe`, which checks which options belong to the recipe."""

    name: str
    margin: int = 0
    power_of_2_scales: bool = False
    block_size: int = 0
    grad_format: str = "e4m3"

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ValueError(f"unknown FP8 recipe {self.name!r}; valid: {', '.join(RECIPES)}")
        if self.grad_format not in GRAD_FORMATS:
            raise ValueError(f"grad_format {self.grad_format!r}; valid: {', '.join(GRAD_FORMATS)}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin must be an integer >= 0, got {self.margin!r}")
        if not isinstance(self.power_of_2_scales, bool):
            raise ValueError(f"power_of_2_scales must be true or false, got {self.power_of_2_scales!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if self.name in ("block", "mxfp8", "nvfp4") and self.block_size < 1:
            raise ValueError(f"recipe {self.name!r} needs block_size >= 1, got {self.block_size}")

    def get_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "Recipe":
        return cls(**config)


def make_recipe(name: str, **options) -> Recipe:
    """The recipe `name` with `options` (None = the recipe's default). An unknown recipe or an
    option the recipe does not take raises ValueError naming what would be valid."""
    if name not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {name!r}; valid: {', '.join(RECIPES)}")
    given = {key: value for key, value in options.items() if value is not None}
    foreign = sorted(set(given) - set(OPTIONS[name]))
    if foreign:
        allowed = ", ".join(OPTIONS[name]) or "none"
        raise ValueError(f"recipe {name!r} does not take {', '.join(foreign)}; its options: {allowed}")
    return Recipe(name=name, **{**DEFAULTS[name], **given})


def indivisible(recipe: Recipe, contraction: int, outputs: int) -> list[str]:
    """Why a layer with kernel [K=contraction, N=outputs] does not tile exactly ([] if it does).
    Block recipes block K (forward) and N (the weight blocks, and dgrad's contraction); nvfp4
    (what-if, forward operands) only K. The token dim M (wgrad's contraction) depends on the
    batch, so it is not checked here and is padded like the others when it does not divide.
    What happens: the operand is padded with zeros to a whole block (exact: see quantize.py)."""
    if recipe.name not in ("block", "mxfp8", "nvfp4"):
        return []
    b = recipe.block_size
    return [f"{what} {size} is not a multiple of block_size {b}: padded with zeros to {-(-size // b) * b}"
            for what, size in (("contraction dim", contraction), ("output dim", outputs))
            if size % b and (what == "contraction dim" or recipe.name != "nvfp4")]
