"""Efficient segmentation transformers in plain PyTorch, each with its inference-time compute knob.
Never imports `service`.

    from models import create_model, get_spec, list_models
    model = create_model("edaformer-t", checkpoint="edaformer_t_ade20k.pth").eval()
    level = model.spec.level("2211/222")               # a named value of the family's knob
    logits = model(images, **level.kwargs)             # here: isr=IsrConfig(encoder=(2, 2, 1, 1), decoder=(2, 2, 2))
"""

# Importing a family module registers its variants.
from models import dovit as _dovit  # noqa: F401
from models import edaformer as _edaformer  # noqa: F401
from models import lrformer as _lrformer  # noqa: F401
from models import seaformer as _seaformer  # noqa: F401
from models import segformer as _segformer  # noqa: F401
from models.base import ModelMeta, SegmentationModel
from models.checkpoint import CheckpointError, load_checkpoint_file
from models.edaformer import EdaFormer
from models.isr import LADDER, IsrConfig, IsrLevel, level_by_name
from models.registry import create_model, get_spec, list_models, register_model
from models.spec import BASE_LEVEL, Knob, Level, ModelSpec

__all__ = [
    "BASE_LEVEL",
    "LADDER",
    "CheckpointError",
    "EdaFormer",
    "IsrConfig",
    "IsrLevel",
    "Knob",
    "Level",
    "ModelMeta",
    "ModelSpec",
    "SegmentationModel",
    "create_model",
    "get_spec",
    "level_by_name",
    "list_models",
    "load_checkpoint_file",
    "register_model",
]
