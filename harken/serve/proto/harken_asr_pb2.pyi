# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Word(_message.Message):
    __slots__ = ("word", "start", "end", "confidence")
    WORD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    word: str
    start: float
    end: float
    confidence: float
    def __init__(self, word: _Optional[str] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., confidence: _Optional[float] = ...) -> None: ...

class RecognitionConfig(_message.Message):
    __slots__ = ("encoding", "sample_rate", "channels", "decoding", "beam_size", "word_timestamps", "hotwords", "language", "model")
    class HotwordsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    WORD_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    HOTWORDS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    encoding: str
    sample_rate: int
    channels: int
    decoding: str
    beam_size: int
    word_timestamps: bool
    hotwords: _containers.ScalarMap[str, float]
    language: str
    model: str
    def __init__(self, encoding: _Optional[str] = ..., sample_rate: _Optional[int] = ..., channels: _Optional[int] = ..., decoding: _Optional[str] = ..., beam_size: _Optional[int] = ..., word_timestamps: _Optional[bool] = ..., hotwords: _Optional[_Mapping[str, float]] = ..., language: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class RecognizeRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("id", "start", "end", "text", "words", "confidence")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: float
    end: float
    text: str
    words: _containers.RepeatedCompositeFieldContainer[Word]
    confidence: float
    def __init__(self, id: _Optional[int] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., text: _Optional[str] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ..., confidence: _Optional[float] = ...) -> None: ...

class RecognizeResponse(_message.Message):
    __slots__ = ("request_id", "text", "duration", "confidence", "words", "segments", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    duration: float
    confidence: float
    words: _containers.RepeatedCompositeFieldContainer[Word]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    model: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., duration: _Optional[float] = ..., confidence: _Optional[float] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class Endpointing(_message.Message):
    __slots__ = ("trailing_silence_ms", "max_segment_ms")
    TRAILING_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEGMENT_MS_FIELD_NUMBER: _ClassVar[int]
    trailing_silence_ms: float
    max_segment_ms: float
    def __init__(self, trailing_silence_ms: _Optional[float] = ..., max_segment_ms: _Optional[float] = ...) -> None: ...

class StreamingConfig(_message.Message):
    __slots__ = ("version", "sample_rate", "encoding", "channels", "language", "interim_results", "word_timestamps", "model", "session_id", "api_key", "endpointing")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    WORD_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTING_FIELD_NUMBER: _ClassVar[int]
    version: int
    sample_rate: int
    encoding: str
    channels: int
    language: str
    interim_results: bool
    word_timestamps: bool
    model: str
    session_id: str
    api_key: str
    endpointing: Endpointing
    def __init__(self, version: _Optional[int] = ..., sample_rate: _Optional[int] = ..., encoding: _Optional[str] = ..., channels: _Optional[int] = ..., language: _Optional[str] = ..., interim_results: _Optional[bool] = ..., word_timestamps: _Optional[bool] = ..., model: _Optional[str] = ..., session_id: _Optional[str] = ..., api_key: _Optional[str] = ..., endpointing: _Optional[_Union[Endpointing, _Mapping]] = ...) -> None: ...

class StreamingRecognizeRequest(_message.Message):
    __slots__ = ("config", "audio", "stop")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    config: StreamingConfig
    audio: bytes
    stop: bool
    def __init__(self, config: _Optional[_Union[StreamingConfig, _Mapping]] = ..., audio: _Optional[bytes] = ..., stop: _Optional[bool] = ...) -> None: ...

class StreamingResult(_message.Message):
    __slots__ = ("type", "session_id", "model", "chunk_ms", "sample_rate", "version", "segment_id", "text", "start", "end", "words", "is_final", "audio_processed", "audio_seconds", "segments", "code", "message", "input_sample_rate")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    type: str
    session_id: str
    model: str
    chunk_ms: float
    sample_rate: int
    version: int
    segment_id: int
    text: str
    start: float
    end: float
    words: _containers.RepeatedCompositeFieldContainer[Word]
    is_final: bool
    audio_processed: float
    audio_seconds: float
    segments: int
    code: str
    message: str
    input_sample_rate: int
    def __init__(self, type: _Optional[str] = ..., session_id: _Optional[str] = ..., model: _Optional[str] = ..., chunk_ms: _Optional[float] = ..., sample_rate: _Optional[int] = ..., version: _Optional[int] = ..., segment_id: _Optional[int] = ..., text: _Optional[str] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ..., is_final: _Optional[bool] = ..., audio_processed: _Optional[float] = ..., audio_seconds: _Optional[float] = ..., segments: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., input_sample_rate: _Optional[int] = ...) -> None: ...
