from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SegmentRequest(_message.Message):
    __slots__ = ("image", "model", "latency_budget_ms", "quality", "level", "format", "strict", "timeout_ms", "task", "point")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    model: str
    latency_budget_ms: float
    quality: str
    level: str
    format: str
    strict: bool
    timeout_ms: float
    task: str
    point: str
    def __init__(self, image: _Optional[bytes] = ..., model: _Optional[str] = ..., latency_budget_ms: _Optional[float] = ..., quality: _Optional[str] = ..., level: _Optional[str] = ..., format: _Optional[str] = ..., strict: bool = ..., timeout_ms: _Optional[float] = ..., task: _Optional[str] = ..., point: _Optional[str] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("model", "level", "isr", "cache", "queue_ms", "compute_ms", "total_ms", "batch_size", "budget_ms", "budget_met", "predicted_ms", "plan_reason", "height", "width", "point", "knob", "knob_value", "scale", "quality", "quality_source", "task", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Values
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Values, _Mapping]] = ...) -> None: ...
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
    POINT_FIELD_NUMBER: _ClassVar[int]
    KNOB_FIELD_NUMBER: _ClassVar[int]
    KNOB_VALUE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    QUALITY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
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
    point: str
    knob: str
    knob_value: str
    scale: float
    quality: float
    quality_source: str
    task: str
    stats: _containers.MessageMap[str, Values]
    def __init__(self, model: _Optional[str] = ..., level: _Optional[str] = ..., isr: _Optional[str] = ..., cache: _Optional[str] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., budget_ms: _Optional[float] = ..., budget_met: bool = ..., predicted_ms: _Optional[float] = ..., plan_reason: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., point: _Optional[str] = ..., knob: _Optional[str] = ..., knob_value: _Optional[str] = ..., scale: _Optional[float] = ..., quality: _Optional[float] = ..., quality_source: _Optional[str] = ..., task: _Optional[str] = ..., stats: _Optional[_Mapping[str, Values]] = ...) -> None: ...

class Values(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

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
    __slots__ = ("name", "rank", "isr", "gmacs", "latency_ms", "knob_value")
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
    KNOB_VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    isr: IsrConfig
    gmacs: float
    latency_ms: _containers.ScalarMap[int, float]
    knob_value: str
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., isr: _Optional[_Union[IsrConfig, _Mapping]] = ..., gmacs: _Optional[float] = ..., latency_ms: _Optional[_Mapping[int, float]] = ..., knob_value: _Optional[str] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("name", "model", "level", "knob_value", "scale", "precision", "network_input", "gmacs", "latency_ms", "quality", "quality_source", "on_ladder")
    class LatencyMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    KNOB_VALUE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    NETWORK_INPUT_FIELD_NUMBER: _ClassVar[int]
    GMACS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    QUALITY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ON_LADDER_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    level: str
    knob_value: str
    scale: float
    precision: str
    network_input: _containers.RepeatedScalarFieldContainer[int]
    gmacs: float
    latency_ms: _containers.ScalarMap[int, float]
    quality: float
    quality_source: str
    on_ladder: bool
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., level: _Optional[str] = ..., knob_value: _Optional[str] = ..., scale: _Optional[float] = ..., precision: _Optional[str] = ..., network_input: _Optional[_Iterable[int]] = ..., gmacs: _Optional[float] = ..., latency_ms: _Optional[_Mapping[int, float]] = ..., quality: _Optional[float] = ..., quality_source: _Optional[str] = ..., on_ladder: bool = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "classes", "num_classes", "dataset", "weights", "backend", "device", "calibration_shape", "levels", "architecture", "family", "task", "knob", "scales", "points")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    KNOB_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    num_classes: int
    dataset: str
    weights: str
    backend: str
    device: str
    calibration_shape: _containers.RepeatedScalarFieldContainer[int]
    levels: _containers.RepeatedCompositeFieldContainer[Level]
    architecture: str
    family: str
    task: str
    knob: str
    scales: _containers.RepeatedScalarFieldContainer[float]
    points: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, name: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., num_classes: _Optional[int] = ..., dataset: _Optional[str] = ..., weights: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., calibration_shape: _Optional[_Iterable[int]] = ..., levels: _Optional[_Iterable[_Union[Level, _Mapping]]] = ..., architecture: _Optional[str] = ..., family: _Optional[str] = ..., task: _Optional[str] = ..., knob: _Optional[str] = ..., scales: _Optional[_Iterable[float]] = ..., points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("name", "models", "ladder")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LADDER_FIELD_NUMBER: _ClassVar[int]
    name: str
    models: _containers.RepeatedScalarFieldContainer[str]
    ladder: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., ladder: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model", "default_task", "tasks", "quality_prior")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TASK_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_PRIOR_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    default_model: str
    default_task: str
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    quality_prior: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., default_model: _Optional[str] = ..., default_task: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., quality_prior: _Optional[str] = ...) -> None: ...
