"""BuildConfig: everything one `build.py` run decides, validated before any work starts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightkv_export.errors import InputError
from lightkv_export.targets import NAMES as TARGETS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
DTYPES |= {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
POSITIONS = ("preserve", "official")
COMPAT = ("none", "official")
DEFAULT_RATIO = 0.55


@dataclass(frozen=True)
class BuildConfig:
    model: str = "tiny-qwen-vl"
    ratio: float | None = None  # fraction of vision-token KV kept, layer-averaged; default 0.55
    schedule: str | None = None  # explicit LAYER:WINDOWS:RATIO,... instead of a ratio
    targets: tuple[str, ...] = ("ort-cpu",)
    out: Path = Path("engines")
    dtype: str = "float32"
    image_size: tuple[int, int] | None = None  # (height, width) of the reference image; default: the model's
    max_image_pixels: int | None = None  # a cap on each image as the processor sizes it, below the checkpoint's own
    positions: str = "preserve"
    compat: str = "none"  # "official": the released code's pseudo-square grid and position reset
    random_weights: bool = False
    force: bool = False  # export again even when the cached export is intact
    vanilla: bool = False  # build engines without LightKV (the baseline)
    parity: bool = True
    parity_gate: bool = True  # a failing parity fails the build (exit 1)
    max_new_tokens_limit: int = 512
    triton_repo: Path | None = None  # also write a Triton model repository here
    batching: Any = None  # its models' scheduler settings (triton_backend.codec.Batching; default: its defaults)

    def __post_init__(self) -> None:
        if self.ratio is not None and self.schedule is not None:
            raise InputError("give either --ratio or --schedule, not both.")
        if self.vanilla and (self.ratio is not None or self.schedule is not None):
            raise InputError("--vanilla builds engines without LightKV: it takes no --ratio or --schedule.")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}.")
        if self.positions not in POSITIONS:
            raise InputError(f"--positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}.")
        if self.compat not in COMPAT:
            raise InputError(f"--compat must be one of {', '.join(COMPAT)}, got {self.compat!r}.")
        if not self.targets:
            raise InputError("no target given; for example --target ort-cpu or --target trt-sm90.")
        for target in self.targets:
            if target not in TARGETS:
                raise InputError(
                    f"unknown target {target!r}; expected one of {', '.join(TARGETS)} (trt is the local GPU; "
                    "trt-smXY a GPU compute capability the LightKV kernels are compiled for)."
                )
        if self.ratio is not None and not (math.isfinite(self.ratio) and 0 <= self.ratio <= 1):
            raise InputError(
                f"--ratio {self.ratio} is not a fraction in [0, 1]: it is the share of vision-token KV kept "
                "(0.55 keeps 55%). Give e.g. --ratio 0.55."
            )
        if self.max_image_pixels is not None and (
            isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int)
            or self.max_image_pixels < 1
        ):  # fmt: skip
            raise InputError(
                f"--max-image-pixels {self.max_image_pixels!r} is not a positive number of pixels; e.g. "
                "--max-image-pixels 1003520 (1280 Qwen-VL tokens of 28 x 28)."
            )
        if self.max_new_tokens_limit < 1:
            raise InputError("max_new_tokens_limit must be >= 1.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def effective_ratio(self) -> float | None:
        if self.vanilla or self.schedule is not None:
            return None
        return DEFAULT_RATIO if self.ratio is None else self.ratio

    @property
    def grid_mode(self) -> str:
        return "official" if self.compat == "official" else "true"

    @property
    def position_mode(self) -> str:
        return "official" if self.compat == "official" else self.positions

    def engine_tag(self) -> str:
        """The <tag> of engines/<model>/<tag>/<target>: ratio or schedule, position mode, the reference image when
        it is not the model's default, and the pixel cap."""
        if self.vanilla:
            tag = "vanilla"
        elif self.schedule is not None:
            tag = "s" + re.sub(r"[^0-9.]+", "-", self.schedule).strip("-")
        else:
            tag = f"r{self.effective_ratio:g}"
        if self.compat == "official":
            tag += "-official"
        elif self.positions != "preserve":
            tag += f"-pos-{self.positions}"
        if self.image_size is not None:  # another reference request (and TensorRT opt point): another engine
            tag += f"-{self.image_size[1]}x{self.image_size[0]}"  # width x height
        if self.max_image_pixels is not None:  # other processor files: another engine
            tag += f"-max{self.max_image_pixels}px"
        return tag


def parse_image_size(text: str) -> tuple[int, int]:
    """'448x336' (width x height, as image sizes are written, like the planner) -> (336, 448): (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"--image-size {text!r} is not WIDTHxHEIGHT in pixels, e.g. 672x672.")
    return int(match.group(2)), int(match.group(1))
