from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SegmentRequest(_message.Message):
    __slots__ = ("image", "model", "latency_budget_ms", "quality", "level", "format", "strict", "timeout_ms")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    model: str
    latency_budget_ms: float
    quality: str
    level: str
    format: str
    strict: bool
    timeout_ms: float
    def __init__(self, image: _Optional[bytes] = ..., model: _Optional[str] = ..., latency_budget_ms: _Optional[float] = ..., quality: _Optional[str] = ..., level: _Optional[str] = ..., format: _Optional[str] = ..., strict: _Optional[bool] = ..., timeout_ms: _Optional[float] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("model", "level", "isr", "cache", "queue_ms", "compute_ms", "total_ms", "batch_size", "budget_ms", "budget_met", "predicted_ms", "plan_reason", "height", "width")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ISR_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MET_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    PLAN_REASON_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    level: str
    isr: str
    cache: str
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_size: int
    budget_ms: float
    budget_met: bool
    predicted_ms: float
    plan_reason: str
    height: int
    width: int
    def __init__(self, model: _Optional[str] = ..., level: _Optional[str] = ..., isr: _Optional[str] = ..., cache: _Optional[str] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., budget_ms: _Optional[float] = ..., budget_met: _Optional[bool] = ..., predicted_ms: _Optional[float] = ..., plan_reason: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("mask", "content_type", "receipt")
    MASK_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    mask: bytes
    content_type: str
    receipt: Receipt
    def __init__(self, mask: _Optional[bytes] = ..., content_type: _Optional[str] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IsrConfig(_message.Message):
    __slots__ = ("encoder", "decoder")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    encoder: _containers.RepeatedScalarFieldContainer[int]
    decoder: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, encoder: _Optional[_Iterable[int]] = ..., decoder: _Optional[_Iterable[int]] = ...) -> None: ...

class Level(_message.Message):
    __slots__ = ("name", "rank", "isr", "gmacs", "latency_ms")
    class LatencyMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ISR_FIELD_NUMBER: _ClassVar[int]
    GMACS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    isr: IsrConfig
    gmacs: float
    latency_ms: _containers.ScalarMap[int, float]
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., isr: _Optional[_Union[IsrConfig, _Mapping]] = ..., gmacs: _Optional[float] = ..., latency_ms: _Optional[_Mapping[int, float]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "classes", "num_classes", "dataset", "weights", "backend", "device", "calibration_shape", "levels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    num_classes: int
    dataset: str
    weights: str
    backend: str
    device: str
    calibration_shape: _containers.RepeatedScalarFieldContainer[int]
    levels: _containers.RepeatedCompositeFieldContainer[Level]
    def __init__(self, name: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., num_classes: _Optional[int] = ..., dataset: _Optional[str] = ..., weights: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., calibration_shape: _Optional[_Iterable[int]] = ..., levels: _Optional[_Iterable[_Union[Level, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...
