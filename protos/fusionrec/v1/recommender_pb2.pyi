from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttributeValue(_message.Message):
    __slots__ = ("string_value", "number_value", "bool_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    number_value: float
    bool_value: bool
    def __init__(self, string_value: _Optional[str] = ..., number_value: _Optional[float] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class Content(_message.Message):
    __slots__ = ("text", "image", "audio")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    audio: bytes
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., audio: _Optional[bytes] = ...) -> None: ...

class ModalityVector(_message.Message):
    __slots__ = ("modality", "values", "encoder_version")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_VERSION_FIELD_NUMBER: _ClassVar[int]
    modality: str
    values: _containers.RepeatedScalarFieldContainer[float]
    encoder_version: str
    def __init__(self, modality: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., encoder_version: _Optional[str] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("attribute", "equals", "range", "in_set")
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    IN_SET_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    equals: AttributeValue
    range: NumericRange
    in_set: ValueSet
    def __init__(self, attribute: _Optional[str] = ..., equals: _Optional[_Union[AttributeValue, _Mapping]] = ..., range: _Optional[_Union[NumericRange, _Mapping]] = ..., in_set: _Optional[_Union[ValueSet, _Mapping]] = ...) -> None: ...

class NumericRange(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class ValueSet(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[AttributeValue]
    def __init__(self, values: _Optional[_Iterable[_Union[AttributeValue, _Mapping]]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "history_item_ids", "query", "k", "filters", "exclude_item_ids", "include_seen", "debug_timings")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    DEBUG_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    query: Content
    k: int
    filters: _containers.RepeatedCompositeFieldContainer[Filter]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_seen: bool
    debug_timings: bool
    def __init__(self, user_id: _Optional[str] = ..., history_item_ids: _Optional[_Iterable[str]] = ..., query: _Optional[_Union[Content, _Mapping]] = ..., k: _Optional[int] = ..., filters: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., include_seen: _Optional[bool] = ..., debug_timings: _Optional[bool] = ...) -> None: ...

class ModalityContribution(_message.Message):
    __slots__ = ("modality", "score")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    modality: str
    score: float
    def __init__(self, modality: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "contributions", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeValue, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    contributions: _containers.RepeatedCompositeFieldContainer[ModalityContribution]
    attributes: _containers.MessageMap[str, AttributeValue]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., contributions: _Optional[_Iterable[_Union[ModalityContribution, _Mapping]]] = ..., attributes: _Optional[_Mapping[str, AttributeValue]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "duration_ms")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    duration_ms: float
    def __init__(self, stage: _Optional[str] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class DroppedModality(_message.Message):
    __slots__ = ("modality", "reason")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    modality: str
    reason: str
    def __init__(self, modality: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "request_id", "modalities_used", "modalities_dropped", "degraded", "model_version", "encoder_versions", "timings")
    class EncoderVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_USED_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    request_id: str
    modalities_used: _containers.RepeatedScalarFieldContainer[str]
    modalities_dropped: _containers.RepeatedCompositeFieldContainer[DroppedModality]
    degraded: bool
    model_version: str
    encoder_versions: _containers.ScalarMap[str, str]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., request_id: _Optional[str] = ..., modalities_used: _Optional[_Iterable[str]] = ..., modalities_dropped: _Optional[_Iterable[_Union[DroppedModality, _Mapping]]] = ..., degraded: _Optional[bool] = ..., model_version: _Optional[str] = ..., encoder_versions: _Optional[_Mapping[str, str]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class ItemInput(_message.Message):
    __slots__ = ("item_id", "attributes", "content", "vectors")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeValue, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    attributes: _containers.MessageMap[str, AttributeValue]
    content: Content
    vectors: _containers.RepeatedCompositeFieldContainer[ModalityVector]
    def __init__(self, item_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, AttributeValue]] = ..., content: _Optional[_Union[Content, _Mapping]] = ..., vectors: _Optional[_Iterable[_Union[ModalityVector, _Mapping]]] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemInput]
    def __init__(self, items: _Optional[_Iterable[_Union[ItemInput, _Mapping]]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("upserted", "encoder_versions")
    class EncoderVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    ENCODER_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    encoder_versions: _containers.ScalarMap[str, str]
    def __init__(self, upserted: _Optional[int] = ..., encoder_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted", "not_found")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class GetItemRequest(_message.Message):
    __slots__ = ("item_id",)
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    def __init__(self, item_id: _Optional[str] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "attributes", "modalities", "encoder_versions", "model_version", "content_kept")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeValue, _Mapping]] = ...) -> None: ...
    class EncoderVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_KEPT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    attributes: _containers.MessageMap[str, AttributeValue]
    modalities: _containers.RepeatedScalarFieldContainer[str]
    encoder_versions: _containers.ScalarMap[str, str]
    model_version: str
    content_kept: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, AttributeValue]] = ..., modalities: _Optional[_Iterable[str]] = ..., encoder_versions: _Optional[_Mapping[str, str]] = ..., model_version: _Optional[str] = ..., content_kept: _Optional[_Iterable[str]] = ...) -> None: ...

class Interaction(_message.Message):
    __slots__ = ("user_id", "item_id", "kind", "timestamp_s", "event_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    kind: str
    timestamp_s: float
    event_id: str
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., kind: _Optional[str] = ..., timestamp_s: _Optional[float] = ..., event_id: _Optional[str] = ...) -> None: ...

class RecordInteractionsRequest(_message.Message):
    __slots__ = ("interactions",)
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    def __init__(self, interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ...) -> None: ...

class RecordInteractionsResponse(_message.Message):
    __slots__ = ("recorded", "duplicates")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    duplicates: int
    def __init__(self, recorded: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...
