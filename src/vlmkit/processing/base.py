"""The interface every preprocessing family implements.

A family turns one RGB image into pixel values for the vision tower and promises a token
layout: how many LLM slots the image takes. That promise is the single source of truth: the
prompt builder expands the placeholder into exactly that many image tokens, the budget
calculator reports it, and the model checks that the connector produced exactly that many.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image


@dataclass(frozen=True)
class TokenLayout:
    """What one image costs in the LLM's sequence."""

    # Slots the model fills with visual embeddings (image-token positions).
    visual_tokens: int
    # Family-specific detail: tiles, grid, resized size, special tokens ...
    parts: dict[str, Any] = field(default_factory=dict)
    # Text tokens the family adds around or between the visual slots ([IMG_BREAK], newlines ...).
    special_tokens: int = 0
    # Image-token positions in the text, when they differ from `visual_tokens`: a cross-attention
    # family (Llama 3.2 Vision) puts one marker in the text and its visual tokens in a memory.
    sequence_slots: int | None = None

    @property
    def slots(self) -> int:
        return self.visual_tokens if self.sequence_slots is None else self.sequence_slots

    @property
    def total_tokens(self) -> int:
        return self.visual_tokens + self.special_tokens


@dataclass(frozen=True)
class Slots:
    """Image-token positions the model fills with this many of the image's tokens, in order."""

    count: int


@dataclass(frozen=True)
class Text:
    """Separator text the family writes around or between the slots ([IMG_BREAK], <img>, row
    tags, <|vision_start|> ...), tokenised by the LM's own tokenizer."""

    text: str


Segment = Slots | Text


def render(segments: tuple[Segment, ...], image_token: str) -> str:
    return "".join(image_token * s.count if isinstance(s, Slots) else s.text for s in segments)


@dataclass(frozen=True)
class View:
    """One input of the vision tower: a tile, a thumbnail, a whole image at native resolution,
    a video frame, or a video's temporal patches. `size` is its (height, width) in pixels; the
    encoder grid follows from it and the tower's patch size, except for pre-flattened patches,
    whose (t, h, w) patch grid the processor states in `grid`.

    A `frame` is a sampled video frame read as an image: the tower encodes it on its frame path
    (`VisionTower.encode_frames`: the image path unless the family has a separate video tower, as
    Video-LLaVA). `pool` (mode, stride) pools the view's feature map spatially before the
    connector (`model/feature_pool.py`: LLaVA-NeXT-Video's frames, "average", 2)."""

    role: Literal["image", "tile", "thumbnail", "patches", "frame"]
    size: tuple[int, int]
    grid: tuple[int, int, int] | None = None
    pool: tuple[str, int] | None = None


@dataclass(frozen=True)
class Arrangement:
    """How a family's views become one image's token block (read by the model's assembler).

    `tiles` (rows, cols): views [first_tile, first_tile + rows*cols) are a row-major tile grid
    whose features are stitched into one feature map (AnyRes); `unpad`: crop that map to the
    original aspect ratio; `newline`: a learned embedding after each feature row; `max_tiles`
    (LLaVA-OneVision's anyres_max_N, 0: no limit): a stitched map larger than 1.1x the area of
    N tiles is resized (bilinear) down to about that area."""

    assembler: str = "concat"
    tiles: tuple[int, int] | None = None
    first_tile: int = 0
    unpad: bool = False
    newline: bool = False
    max_tiles: int = 0


@dataclass
class ProcessedImage:
    # Views stacked in view order: (views, 3, H, W) for image-shaped views of one size, or
    # (patches, C*T*p*p) for a family that flattens patches itself (Qwen2-VL).
    pixel_values: torch.Tensor
    layout: TokenLayout
    extra: dict[str, Any] = field(default_factory=dict)  # reference-processor outputs, for display
    views: tuple[View, ...] = ()
    image_size: tuple[int, int] | None = None  # original (height, width)
    arrangement: Arrangement = Arrangement()
    # The instruction this image is asked about (the text of the message holding it), in the
    # connector's own tokenizer, for a connector that reads it (`Connector.reads_instruction`);
    # the chat processor fills it.
    instruction_ids: torch.Tensor | None = None

    def view_pixels(self) -> list[torch.Tensor]:
        """Each view's pixels: (3, H, W), or (patches, dim) for flattened patches."""
        if self.views and self.views[0].role == "patches":
            out, at = [], 0
            for v in self.views:
                t, h, w = v.grid
                n = t * h * w
                out.append(self.pixel_values[at : at + n])
                at += n
            return out
        # Views of different sizes (Idefics2's quadrants and whole image) sit top-left in a stack
        # of the largest size.
        return [p if tuple(p.shape[-2:]) == tuple(v.size) else p[:, : v.size[0], : v.size[1]]
                for p, v in zip(self.pixel_values, self.views)]


@dataclass(frozen=True)
class VisualBatch:
    """What the model reads of a batch's images and videos, and the one form it takes them in:
    each token group (an image, a video's temporal chunk) with its views, pixels, grids, original
    size and arrangement, in the order its tokens appear in the text; and, where a frozen tower's
    features were cached, those features instead of a tower pass: per image, one (t, h*w, C)
    tensor per view."""

    images: tuple[ProcessedImage, ...] = ()
    features: tuple[tuple[torch.Tensor, ...], ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "images", tuple(self.images))
        if self.features is not None:
            if len(self.features) != len(self.images):
                raise ValueError(f"{len(self.features)} cached feature sets for {len(self.images)} images")
            object.__setattr__(self, "features", tuple(tuple(f) for f in self.features))

    @classmethod
    def of_pixels(cls, pixels: torch.Tensor) -> "VisualBatch":
        """Stacked (images, 3, H, W) pixels, each one single-view image (fixed resolution)."""
        return cls(tuple(ProcessedImage(p[None], TokenLayout(0), views=image_views(p[None], ["image"])) for p in pixels))

    def __len__(self) -> int:
        return len(self.images)

    def __bool__(self) -> bool:
        return bool(self.images)


def image_views(pixels: torch.Tensor, roles: list[str]) -> tuple[View, ...]:
    """Views of a stacked (views, 3, H, W) tensor, one role per view."""
    size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
    return tuple(View(role, size) for role in roles)


class ImageProcessor(ABC):
    """One preprocessing family."""

    # The model needs a learned row-separator embedding (`image_newline`, trained and saved with
    # the connector) that the processor's arrangement places after feature rows or images
    # (LLaVA-NeXT's AnyRes with unpadding, LLaVA-OneVision). Off by default.
    learned_newline: bool = False
    # Whether images keep their own size (native resolution: Qwen2-VL, Pixtral): views have no
    # fixed encoder grid, so the connector is not checked against the base image's grid.
    native_resolution: bool = False
    # Whether the vision tower's patch embedding spans several frames (Qwen2-VL's 3D patches): a
    # video under `temporal-patch` compression then fills each patch's temporal axis with
    # consecutive frames (`temporal_patch_layout` / `temporal_patch_group`); otherwise each pair of
    # frames is averaged.
    reads_temporal_patches: bool = False

    @abstractmethod
    def layout(self, width: int, height: int) -> TokenLayout:
        """Token layout for an image of this size, without touching pixels."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> ProcessedImage:
        """Pixels for the vision tower, plus the layout (must equal `layout(w, h)`)."""

    def for_sample(self, n_images: int) -> "ImageProcessor":
        """The processor for each image of a sample that holds `n_images` images. Most families
        read every image alike (self); LLaVA-OneVision reads the images of a multi-image sample
        at base resolution only."""
        return self

    def for_video(self) -> "ImageProcessor":
        """The processor each sampled video frame goes through (SmolVLM2 reads frames as single
        square images, never split); self by default."""
        return self

    def temporal_patch_layout(self, width: int, height: int, frames: int) -> TokenLayout:
        """One video of `frames` sampled frames of this size as one group of temporal patches:
        its visual tokens, `parts["grid_thw"]` (the patch grid) and special tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not read temporal patches")

    def temporal_patch_group(self, frames: list[Image.Image]) -> tuple[ProcessedImage, tuple[int, int, int]]:
        """The frames as one group of temporal patches (pixels, layout, one `patches` view), and
        the (t, h, w) grid of its LLM tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not read temporal patches")

    def video_text(self, groups: list[str], timestamps: list[float], duration: float) -> str:
        """What a video placeholder becomes, from each token group's placeholder text, the sampled
        frames' times and the video's duration (seconds): the groups in order by default."""
        return "".join(groups)

    def finish_text(self, text: str) -> str:
        """A turn's text once its placeholders are expanded, as the family's own processor leaves
        it (Idefics2 shares boundary tokens between adjacent images); as is by default."""
        return text

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        """What one `<image>` placeholder becomes, as typed segments: the slots the model fills and
        the family's separator text around and between them. Families with separators override it."""
        return (Slots(layout.slots),)

    def placeholder_text(self, layout: TokenLayout, image_token: str) -> str:
        """The text that replaces one `<image>` placeholder (the segments, with `image_token` per slot)."""
        return render(self.segments(layout), image_token)
