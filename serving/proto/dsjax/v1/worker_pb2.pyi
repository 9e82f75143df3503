from serving.proto.dsjax.v1 import dsjax_pb2 as _dsjax_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    PREFILL: _ClassVar[Role]
    DECODE: _ClassVar[Role]
    COLOCATED: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
PREFILL: Role
DECODE: Role
COLOCATED: Role

class WorkerRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "sampling", "seed", "eos_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _dsjax_pb2.SamplingParams
    seed: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_dsjax_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KVDescriptor(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "block_size", "num_tokens", "dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_tokens: int
    dtype: str
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., num_tokens: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("kv", "layout", "first_layer", "num_layers", "first_block", "num_blocks", "k", "v", "index", "count", "checksum")
    KV_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    kv: KVDescriptor
    layout: str
    first_layer: int
    num_layers: int
    first_block: int
    num_blocks: int
    k: bytes
    v: bytes
    index: int
    count: int
    checksum: int
    def __init__(self, kv: _Optional[_Union[KVDescriptor, _Mapping]] = ..., layout: _Optional[str] = ..., first_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., k: _Optional[bytes] = ..., v: _Optional[bytes] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: WorkerRequest
    def __init__(self, request: _Optional[_Union[WorkerRequest, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("token_id", "finish_reason", "kv", "lease_ms", "queue_seconds", "prefill_seconds")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    finish_reason: _dsjax_pb2.FinishReason
    kv: KVDescriptor
    lease_ms: int
    queue_seconds: float
    prefill_seconds: float
    def __init__(self, token_id: _Optional[int] = ..., finish_reason: _Optional[_Union[_dsjax_pb2.FinishReason, str]] = ..., kv: _Optional[_Union[KVDescriptor, _Mapping]] = ..., lease_ms: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ...) -> None: ...

class PullKVRequest(_message.Message):
    __slots__ = ("request_id", "max_chunk_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    max_chunk_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("unknown_ids",)
    UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    unknown_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, unknown_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class KVSource(_message.Message):
    __slots__ = ("worker_id", "address", "kv", "lease_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    kv: KVDescriptor
    lease_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., kv: _Optional[_Union[KVDescriptor, _Mapping]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request", "source")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    request: WorkerRequest
    source: KVSource
    def __init__(self, request: _Optional[_Union[WorkerRequest, _Mapping]] = ..., source: _Optional[_Union[KVSource, _Mapping]] = ...) -> None: ...

class Migration(_message.Message):
    __slots__ = ("bytes", "chunks", "wait_seconds", "pull_seconds", "insert_seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PULL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INSERT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    chunks: int
    wait_seconds: float
    pull_seconds: float
    insert_seconds: float
    def __init__(self, bytes: _Optional[int] = ..., chunks: _Optional[int] = ..., wait_seconds: _Optional[float] = ..., pull_seconds: _Optional[float] = ..., insert_seconds: _Optional[float] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "migration")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _dsjax_pb2.FinishReason
    migration: Migration
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_dsjax_pb2.FinishReason, str]] = ..., migration: _Optional[_Union[Migration, _Mapping]] = ...) -> None: ...

class ReplicaRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: WorkerRequest
    def __init__(self, request: _Optional[_Union[WorkerRequest, _Mapping]] = ...) -> None: ...

class ReplicaResponse(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "queue_seconds", "prefill_seconds", "recomputes")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _dsjax_pb2.FinishReason
    queue_seconds: float
    prefill_seconds: float
    recomputes: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_dsjax_pb2.FinishReason, str]] = ..., queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., recomputes: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstanceStats(_message.Message):
    __slots__ = ("worker_id", "role", "address", "pid", "tp", "pp", "num_blocks", "free_blocks", "waiting", "running", "held", "pulling", "migrations", "kv_bytes", "leases_expired", "alive", "stalled_seconds", "hung", "kv_checksum_failures", "routed", "routed_tokens", "continued_steps", "host_gap_seconds", "prefill_launches", "prefill_host_gap_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    PULLING_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    STALLED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HUNG_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    ROUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTINUED_STEPS_FIELD_NUMBER: _ClassVar[int]
    HOST_GAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LAUNCHES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HOST_GAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: Role
    address: str
    pid: int
    tp: int
    pp: int
    num_blocks: int
    free_blocks: int
    waiting: int
    running: int
    held: int
    pulling: int
    migrations: int
    kv_bytes: int
    leases_expired: int
    alive: bool
    stalled_seconds: float
    hung: bool
    kv_checksum_failures: int
    routed: int
    routed_tokens: int
    continued_steps: int
    host_gap_seconds: float
    prefill_launches: int
    prefill_host_gap_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., tp: _Optional[int] = ..., pp: _Optional[int] = ..., num_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., waiting: _Optional[int] = ..., running: _Optional[int] = ..., held: _Optional[int] = ..., pulling: _Optional[int] = ..., migrations: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., leases_expired: _Optional[int] = ..., alive: _Optional[bool] = ..., stalled_seconds: _Optional[float] = ..., hung: _Optional[bool] = ..., kv_checksum_failures: _Optional[int] = ..., routed: _Optional[int] = ..., routed_tokens: _Optional[int] = ..., continued_steps: _Optional[int] = ..., host_gap_seconds: _Optional[float] = ..., prefill_launches: _Optional[int] = ..., prefill_host_gap_seconds: _Optional[float] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "pid", "tp", "pp", "model", "block_size", "dtype", "weights_hash")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: Role
    address: str
    pid: int
    tp: int
    pp: int
    model: str
    block_size: int
    dtype: str
    weights_hash: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., tp: _Optional[int] = ..., pp: _Optional[int] = ..., model: _Optional[str] = ..., block_size: _Optional[int] = ..., dtype: _Optional[str] = ..., weights_hash: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_seconds", "prefill_addresses")
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    heartbeat_seconds: float
    prefill_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, heartbeat_seconds: _Optional[float] = ..., prefill_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "stats")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    stats: InstanceStats
    def __init__(self, worker_id: _Optional[str] = ..., stats: _Optional[_Union[InstanceStats, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("registered", "prefill_addresses")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    registered: bool
    prefill_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, registered: _Optional[bool] = ..., prefill_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class InstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStats]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceStats, _Mapping]]] = ...) -> None: ...
