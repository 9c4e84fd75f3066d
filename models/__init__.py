"""EDAFormer in plain PyTorch with Inference Spatial Reduction. Never imports `service`.

    from models import create_model, IsrConfig
    model = create_model("edaformer-t", num_classes=150, checkpoint="edaformer_t_ade20k.pth").eval()
    logits = model(images, isr=IsrConfig(encoder=(2, 2, 1, 1), decoder=(2, 2, 2)))
"""

from models import edaformer as _edaformer  # noqa: F401  (registers the variants)
from models.checkpoint import CheckpointError, load_checkpoint_file
from models.edaformer import EdaFormer, ModelMeta
from models.isr import LADDER, IsrConfig, IsrLevel, level_by_name
from models.registry import create_model, list_models, register_model

__all__ = [
    "LADDER",
    "CheckpointError",
    "EdaFormer",
    "IsrConfig",
    "IsrLevel",
    "ModelMeta",
    "create_model",
    "level_by_name",
    "list_models",
    "load_checkpoint_file",
    "register_model",
]
