"""The hostile-input suite: malformed, oversized and expensive requests to every RPC, each with the
status it must get; afterwards the service must still answer.

A case is (name, RPC, request builder, expected codes). Requests are built lazily, one at a time
(several are tens of MB). `run_hostile` needs a running service and nothing else (no Ray).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.bench.reliability import media
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

OK, INVALID, NOT_FOUND = "OK", "INVALID_ARGUMENT", "NOT_FOUND"
EXHAUSTED, UNAUTHENTICATED = "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"
#: Vector dims of the packaged encoders (deploy/local.yaml); pass others to `run_hostile`.
DEFAULT_DIMS = {"text": 384, "image": 1280, "audio": 174}
BASE_ITEM, BASE_USER = "hostile-base", "hostile-user"
MiB = 1024 * 1024
ASTRAL = "\U0001F600"  # 4 UTF-8 bytes, 1 character (2 UTF-16 units)


@dataclass(frozen=True)
class Case:
    name: str
    rpc: str  # a Recommender method, or "Health.Check"
    build: Callable[[], Any]
    expected: tuple[str, ...]
    auth: str = "token"  # "token": the configured one; "none": no metadata; "wrong": a wrong token


@dataclass
class Context:
    """What cases refer to: the encoder versions (for bring-your-own vectors) and vector dims."""

    versions: dict[str, str]
    dims: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_DIMS))


def _av(value: Any) -> pb.AttributeValue:
    if isinstance(value, bool):
        return pb.AttributeValue(bool_value=value)
    if isinstance(value, (int, float)):
        return pb.AttributeValue(number_value=float(value))
    return pb.AttributeValue(string_value=value)


def _rec(**kw: Any) -> Callable[[], pb.RecommendRequest]:
    return lambda: pb.RecommendRequest(**({"user_id": BASE_USER} | kw))


def _query(**content: Any) -> Callable[[], pb.RecommendRequest]:
    return lambda: pb.RecommendRequest(user_id=BASE_USER, query=pb.Content(**{k: v() if callable(v) else v
                                                                                for k, v in content.items()}))


def _filters(*filters: pb.Filter) -> Callable[[], pb.RecommendRequest]:
    return lambda: pb.RecommendRequest(user_id=BASE_USER, filters=list(filters))


def _upsert(*items: Callable[[], pb.ItemInput] | pb.ItemInput) -> Callable[[], pb.UpsertItemsRequest]:
    return lambda: pb.UpsertItemsRequest(items=[i() if callable(i) else i for i in items])


def _item(item_id: str = "hostile-x", text: str = "a plain item", **kw: Any) -> pb.ItemInput:
    content = kw.pop("content", None) or (pb.Content(text=text) if text else None)
    attrs = {k: _av(v) for k, v in kw.pop("attributes", {}).items()}
    return pb.ItemInput(item_id=item_id, content=content, attributes=attrs, **kw)


def _events(*events: pb.Interaction) -> Callable[[], pb.RecordInteractionsRequest]:
    return lambda: pb.RecordInteractionsRequest(interactions=list(events))


def _event(user: str = BASE_USER, item: str = BASE_ITEM, kind: str = "view", ts: float = 1.7e9) -> pb.Interaction:
    return pb.Interaction(user_id=user, item_id=item, kind=kind, timestamp_s=ts)


def recommend_cases() -> list[Case]:
    rng = lambda lo, hi: pb.Filter(attribute="year", range=pb.NumericRange(min=lo, max=hi))  # noqa: E731
    c = [
        Case("recommend: by user", "Recommend", _rec(), (OK,)),
        Case("recommend: unknown user gets popular items", "Recommend", _rec(user_id="nobody-at-all"), (OK,)),
        Case("recommend: nothing to go on", "Recommend", lambda: pb.RecommendRequest(), (INVALID,)),
        Case("recommend: k = -1", "Recommend", _rec(k=-1), (INVALID,)),
        Case("recommend: k = 501 (over max_k)", "Recommend", _rec(k=501), (INVALID,)),
        Case("recommend: k = 2^31-1", "Recommend", _rec(k=2**31 - 1), (INVALID,)),
        Case("recommend: user id of 257 ASCII bytes", "Recommend", _rec(user_id="u" * 257), (INVALID,)),
        Case("recommend: user id of 256 astral chars", "Recommend", _rec(user_id=ASTRAL * 256), (INVALID,)),
        Case("recommend: user id of 64 astral chars (256 bytes)", "Recommend", _rec(user_id=ASTRAL * 64), (OK,)),
        Case("recommend: 201 history ids", "Recommend",
             lambda: pb.RecommendRequest(history_item_ids=[f"h{i}" for i in range(201)]), (INVALID,)),
        Case("recommend: history of unknown ids", "Recommend",
             lambda: pb.RecommendRequest(history_item_ids=["no-such-1", "no-such-2"]), (OK,)),
        Case("recommend: history id of 300 bytes", "Recommend",
             lambda: pb.RecommendRequest(history_item_ids=["h" * 300]), (INVALID,)),
        Case("recommend: 10001 excluded ids", "Recommend",
             _rec(exclude_item_ids=[f"x{i}" for i in range(10_001)]), (INVALID,)),
        Case("recommend: excluded id of 300 bytes", "Recommend", _rec(exclude_item_ids=["x" * 300]), (OK,)),
        Case("recommend: 17 filters", "Recommend", _filters(*[rng(0, 1)] * 17), (INVALID,)),
        Case("recommend: filter name with trailing newline", "Recommend",
             _filters(pb.Filter(attribute="year\n", equals=_av(1))), (INVALID,)),
        Case("recommend: empty filter name", "Recommend", _filters(pb.Filter(attribute="", equals=_av(1))), (INVALID,)),
        Case("recommend: filter name as an expression", "Recommend",
             _filters(pb.Filter(attribute="year == 1 or 1", equals=_av(1))), (INVALID,)),
        Case("recommend: filter with no condition", "Recommend", _filters(pb.Filter(attribute="year")), (INVALID,)),
        Case("recommend: range min > max", "Recommend", _filters(rng(2020, 2000)), (INVALID,)),
        Case("recommend: range bound NaN", "Recommend", _filters(rng(float("nan"), 1)), (INVALID,)),
        Case("recommend: range bound inf", "Recommend", _filters(rng(0, float("inf"))), (INVALID,)),
        Case("recommend: empty in_set", "Recommend",
             _filters(pb.Filter(attribute="category", in_set=pb.ValueSet())), (INVALID,)),
        Case("recommend: in_set of 1001 values", "Recommend", _filters(pb.Filter(
            attribute="category", in_set=pb.ValueSet(values=[_av(f"c{i}") for i in range(1001)]))), (INVALID,)),
        Case("recommend: filter on an attribute no item has", "Recommend",
             _filters(pb.Filter(attribute="no_such_attr", equals=_av("x"))), (OK,)),
        Case("recommend: equals value with quotes and operators", "Recommend",
             _filters(pb.Filter(attribute="category", equals=_av('cat" or 1==1 or "'))), (OK,)),
    ]
    return c


def text_cases() -> list[Case]:
    return [
        Case("text query", "Recommend", _query(text="a calm photo of a cat"), (OK,)),
        Case("text query of 5 MB", "Recommend", _query(text=lambda: "word " * (1 << 20)), (INVALID,)),
        Case("text query of 64 KiB + 1 bytes", "Recommend", _query(text=lambda: "a" * (64 * 1024 + 1)), (INVALID,)),
        Case("text query of 60 MB", "Recommend", _query(text=lambda: "x" * (60 * 1000 * 1000)), (INVALID,)),
        Case("text query of whitespace only", "Recommend", _query(text=" \n\t "), (INVALID,)),
        Case("text query with control characters", "Recommend", _query(text="\x00\x01cat\x7f"), (OK,)),
        Case("text query of 300 emoji", "Recommend", _query(text=ASTRAL * 300), (OK,)),
        Case("text query of 16k multi-byte chars (48 KB)", "Recommend", _query(text="語" * 16_000), (OK,)),
    ]


def image_cases() -> list[Case]:
    def truncated_jpeg() -> bytes:
        whole = media.picture(size=(256, 256), fmt="JPEG")
        return whole[: len(whole) // 2]

    return [
        Case("image query: PNG", "Recommend", _query(image=lambda: media.picture()), (OK,)),
        Case("image query: JPEG", "Recommend", _query(image=lambda: media.picture(fmt="JPEG")), (OK,)),
        Case("image query: greyscale PNG", "Recommend", _query(image=lambda: media.picture("L")), (OK,)),
        Case("image query: palette PNG", "Recommend", _query(image=lambda: media.picture("P")), (OK,)),
        Case("image query: RGBA PNG", "Recommend", _query(image=lambda: media.picture("RGBA")), (OK,)),
        Case("image query: CMYK JPEG", "Recommend", _query(image=lambda: media.picture("CMYK", fmt="JPEG")), (OK,)),
        Case("image query: 1x1 PNG", "Recommend", _query(image=lambda: media.picture(size=(1, 1))), (OK,)),
        Case("image query: random bytes", "Recommend", _query(image=lambda: media.noise_bytes(4096)), (INVALID,)),
        Case("image query: truncated JPEG", "Recommend", _query(image=truncated_jpeg), (INVALID,)),
        Case("image query: PNG header claiming 100 Mpx (pixel cap)", "Recommend",
             _query(image=lambda: media.png_header_only(10_000, 10_000)), (INVALID,)),
        Case("image query: 16-bit grey PNG of 88 Mpx (~170 KB)", "Recommend",
             _query(image=lambda: media.png_of_zeros(9_400, 9_400, 16, 0)), (INVALID,)),
        Case("image query: 16-bit RGBA PNG of 25 Mpx (decoded-bytes cap)", "Recommend",
             _query(image=lambda: media.png_header_only(5_000, 5_000, 16, 6)), (INVALID,)),
        Case("image query: 63 MB of noise", "Recommend",
             _query(image=lambda: media.noise_bytes(63 * 1000 * 1000)), (INVALID,)),
        Case("image query: 65 MiB (over max_message_mb)", "Recommend",
             _query(image=lambda: bytes(65 * MiB)), (EXHAUSTED,)),
    ]


def audio_cases() -> list[Case]:
    return [
        Case("audio query: WAV tone", "Recommend", _query(audio=lambda: media.tone()), (OK,)),
        Case("audio query: FLAC tone", "Recommend", _query(audio=lambda: media.tone(fmt="FLAC")), (OK,)),
        Case("audio query: Ogg Vorbis tone", "Recommend",
             _query(audio=lambda: media.tone(fmt="OGG", subtype="VORBIS")), (OK,)),
        Case("audio query: 10 min tone at 8 kHz (9.6 MB, 30 s analysed)", "Recommend",
             _query(audio=lambda: media.tone(600, 8_000)), (OK,)),
        Case("audio query: 10 min of silence (9.6 MB)", "Recommend",
             _query(audio=lambda: media.wav_of_silence(600)), (INVALID,)),
        Case("audio query: FLAC at 384 kHz x 8 channels", "Recommend",
             _query(audio=lambda: media.flac_mostly_silent(30, 384_000, 8)), (INVALID,)),
        Case("audio query: FLAC at 192 kHz x 8 channels, 30 s (sample cap)", "Recommend",
             _query(audio=lambda: media.flac_mostly_silent(30, 192_000, 8)), (INVALID,)),
        Case("audio query: WAV of 32 channels", "Recommend",
             _query(audio=lambda: media.tone(1, 16_000, channels=32)), (INVALID,)),
        Case("audio query: WAV header claiming 10 min, truncated", "Recommend",
             _query(audio=lambda: media.wav_of_silence(600, 48_000, 2)[:44] + bytes(4096)), (INVALID,)),
        Case("audio query: random bytes", "Recommend", _query(audio=lambda: media.noise_bytes(8192)), (INVALID,)),
        Case("query: text, image and audio together", "Recommend",
             _query(text="a cat", image=lambda: media.picture(), audio=lambda: media.tone()), (OK,)),
    ]


def _vector(ctx: Context, modality: str = "text", fill: Callable[[int], np.ndarray] | None = None,
            dim: int | None = None, version: str | None = None) -> pb.ModalityVector:
    n = dim if dim is not None else ctx.dims[modality]
    values = fill(n) if fill else np.random.default_rng(n).standard_normal(n).astype(np.float32)
    return pb.ModalityVector(modality=modality, values=values.tolist(),
                             encoder_version=ctx.versions.get(modality, "") if version is None else version)


def _byo(ctx: Context, name: str, fill: Callable[[int], np.ndarray] | None, expected: str, **kw: Any) -> Case:
    return Case(f"upsert: bring-your-own vector, {name}", "UpsertItems",
                _upsert(lambda: _item("hostile-byo", text="", vectors=[_vector(ctx, fill=fill, **kw)])), (expected,))


def vector_cases(ctx: Context) -> list[Case]:
    full = lambda v: (lambda n: np.full(n, v, dtype=np.float64))  # noqa: E731
    return [
        _byo(ctx, "valid", None, OK),
        _byo(ctx, "NaN", full(float("nan")), INVALID),
        _byo(ctx, "inf", full(float("inf")), INVALID),
        _byo(ctx, "huge finite (1e30)", full(1e30), INVALID),
        _byo(ctx, "huge but within float32 (3e38)", full(3e38), INVALID),
        _byo(ctx, "denormal (1e-40)", full(1e-40), INVALID),
        _byo(ctx, "all zero", full(0.0), INVALID),
        _byo(ctx, "wrong dim", None, INVALID, dim=7),
        _byo(ctx, "empty", None, INVALID, dim=0),
        _byo(ctx, "another encoder's version", None, INVALID, version="minilm-l6-v2@000000000000"),
        Case("upsert: vector of an unknown modality", "UpsertItems", _upsert(lambda: _item(
            "hostile-byo", text="", vectors=[pb.ModalityVector(modality="smell", values=[1.0, 2.0])])), (INVALID,)),
        Case("upsert: text as content and as a vector", "UpsertItems",
             _upsert(lambda: _item("hostile-byo", vectors=[_vector(ctx)])), (INVALID,)),
    ]


def upsert_cases() -> list[Case]:
    attrs = lambda **a: _upsert(_item(attributes=a))  # noqa: E731
    return [
        Case("upsert: text item with attributes", "UpsertItems",
             _upsert(_item(BASE_ITEM, "a calm photo of a cat", attributes={"category": "cat", "year": 2019})), (OK,)),
        Case("upsert: image and audio content", "UpsertItems", _upsert(lambda: _item(
            "hostile-media", text="", content=pb.Content(image=media.picture(), audio=media.tone()))), (OK,)),
        Case("upsert: no items", "UpsertItems", lambda: pb.UpsertItemsRequest(), (INVALID,)),
        Case("upsert: 257 items (over max_upsert_batch)", "UpsertItems",
             lambda: pb.UpsertItemsRequest(items=[_item(f"hb-{i}") for i in range(257)]), (INVALID,)),
        Case("upsert: empty id", "UpsertItems", _upsert(_item("")), (INVALID,)),
        Case("upsert: id of 257 bytes", "UpsertItems", _upsert(_item("i" * 257)), (INVALID,)),
        Case("upsert: id of 256 astral chars", "UpsertItems", _upsert(_item(ASTRAL * 256)), (INVALID,)),
        Case("upsert: id of exactly 256 bytes", "UpsertItems", _upsert(_item("i" * 256)), (OK,)),
        Case("upsert: the same id twice in a batch", "UpsertItems", _upsert(_item("dup"), _item("dup")), (INVALID,)),
        Case("upsert: attribute name with trailing newline", "UpsertItems", attrs(**{"year\n": 1}), (INVALID,)),
        Case("upsert: attribute name starting with a digit", "UpsertItems", attrs(**{"1year": 1}), (INVALID,)),
        Case("upsert: attribute name of 65 chars", "UpsertItems", attrs(**{"a" * 65: 1}), (INVALID,)),
        Case("upsert: 65 attributes", "UpsertItems", attrs(**{f"a{i}": i for i in range(65)}), (INVALID,)),
        Case("upsert: string attribute of 4097 bytes", "UpsertItems", attrs(note="n" * 4097), (INVALID,)),
        Case("upsert: NaN attribute", "UpsertItems", attrs(price=float("nan")), (INVALID,)),
        Case("upsert: no content and no vectors", "UpsertItems", _upsert(_item(text="")), (INVALID,)),
        Case("upsert: text content of 5 MB", "UpsertItems", _upsert(lambda: _item(text="word " * (1 << 20))),
             (INVALID,)),
        Case("upsert: corrupt image content", "UpsertItems", _upsert(lambda: _item(
            text="", content=pb.Content(image=media.noise_bytes(2048)))), (INVALID,)),
        Case("upsert: silent audio content", "UpsertItems", _upsert(lambda: _item(
            text="", content=pb.Content(audio=media.wav_of_silence(5)))), (INVALID,)),
        Case("upsert: 63 MB image content", "UpsertItems", _upsert(lambda: _item(
            text="", content=pb.Content(image=media.noise_bytes(63 * 1000 * 1000, seed=1)))), (INVALID,)),
    ]


def delete_and_get_cases() -> list[Case]:
    delete = lambda ids: (lambda: pb.DeleteItemsRequest(item_ids=ids))  # noqa: E731
    get = lambda item_id: (lambda: pb.GetItemRequest(item_id=item_id))  # noqa: E731
    return [
        Case("delete: an item", "DeleteItems", delete(["i" * 256]), (OK,)),
        Case("delete: no ids", "DeleteItems", delete([]), (INVALID,)),
        Case("delete: 1001 ids (over max_delete_batch)", "DeleteItems", delete([f"d{i}" for i in range(1001)]),
             (INVALID,)),
        Case("delete: 1000 unknown ids", "DeleteItems", delete([f"d{i}" for i in range(1000)]), (OK,)),
        Case("delete: id of 300 bytes", "DeleteItems", delete(["d" * 300]), (INVALID,)),
        Case("delete: empty id", "DeleteItems", delete([""]), (INVALID,)),
        Case("get: an item", "GetItem", get(BASE_ITEM), (OK,)),
        Case("get: unknown id", "GetItem", get("no-such-item"), (NOT_FOUND,)),
        Case("get: empty id", "GetItem", get(""), (INVALID,)),
        Case("get: id of 256 astral chars", "GetItem", get(ASTRAL * 256), (INVALID,)),
        Case("get: id with a newline and quotes", "GetItem", get('x"\nor id != "'), (NOT_FOUND,)),
    ]


def interaction_cases() -> list[Case]:
    return [
        Case("interactions: one event", "RecordInteractions", _events(_event()), (OK,)),
        Case("interactions: none", "RecordInteractions", _events(), (INVALID,)),
        Case("interactions: 10001 events (over max_interactions_batch)", "RecordInteractions",
             lambda: pb.RecordInteractionsRequest(interactions=[_event()] * 10_001), (INVALID,)),
        Case("interactions: unknown item", "RecordInteractions", _events(_event(item="no-such-item")), (NOT_FOUND,)),
        Case("interactions: kind of 64 multi-byte chars", "RecordInteractions", _events(_event(kind="é" * 64)),
             (INVALID,)),
        Case("interactions: user id of 257 bytes", "RecordInteractions", _events(_event(user="u" * 257)), (INVALID,)),
        Case("interactions: NaN timestamp", "RecordInteractions", _events(_event(ts=float("nan"))), (INVALID,)),
        Case("interactions: negative timestamp", "RecordInteractions", _events(_event(ts=-1.0)), (INVALID,)),
        Case("interactions: infinite timestamp", "RecordInteractions", _events(_event(ts=float("inf"))), (INVALID,)),
        Case("interactions: year 9999 timestamp", "RecordInteractions", _events(_event(ts=253_402_300_000.0)),
             (INVALID,)),
    ]


def health_and_auth_cases(with_token: bool) -> list[Case]:
    check = lambda service: (lambda: health_pb2.HealthCheckRequest(service=service))  # noqa: E731
    cases = [
        Case("health: whole server", "Health.Check", check(""), (OK,)),
        Case("health: the Recommender service", "Health.Check", check("fusionrec.v1.Recommender"), (OK,)),
        Case("health: an unknown service", "Health.Check", check("no.such.Service"), (NOT_FOUND,)),
    ]
    if with_token:  # only meaningful when the server requires a token
        cases += [
            Case("auth: recommend without a token", "Recommend", _rec(), (UNAUTHENTICATED,), auth="none"),
            Case("auth: recommend with a wrong token", "Recommend", _rec(), (UNAUTHENTICATED,), auth="wrong"),
            Case("auth: upsert without a token", "UpsertItems", _upsert(_item()), (UNAUTHENTICATED,), auth="none"),
            Case("auth: get without a token", "GetItem", lambda: pb.GetItemRequest(item_id=BASE_ITEM),
                 (UNAUTHENTICATED,), auth="none"),
            Case("auth: health without a token", "Health.Check", check(""), (OK,), auth="none"),
        ]
    return cases


def all_cases(ctx: Context, with_token: bool) -> list[Case]:
    """Every case, in order (the base item and its event come first: later cases refer to them)."""
    upserts = upsert_cases()
    events = interaction_cases()
    return (upserts[:1] + events[:1] + upserts[1:] + events[1:] + recommend_cases() + text_cases()
            + image_cases() + audio_cases() + vector_cases(ctx) + delete_and_get_cases()
            + health_and_auth_cases(with_token))


@dataclass
class Outcome:
    name: str
    rpc: str
    expected: list[str]
    got: str
    ms: float
    message: str

    @property
    def unexpected(self) -> bool:
        return self.got not in self.expected


def open_channel(target: str) -> grpc.Channel:
    """A plain channel that may send and receive the suite's largest messages (beyond the server's limit)."""
    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1),
                                                  ("grpc.max_receive_message_length", 128 * MiB)])


def _metadata(auth: str, token: str) -> tuple:
    if auth == "none" or (auth == "token" and not token):
        return ()
    return (("authorization", f"Bearer {token if auth == 'token' else token + '-wrong'}"),)


def call_case(channel: grpc.Channel, case: Case, token: str, timeout_s: float) -> Outcome:
    """Send one case and record the status it got."""
    if case.rpc.startswith("Health."):
        method = getattr(health_pb2_grpc.HealthStub(channel), case.rpc.split(".", 1)[1])
    else:
        method = getattr(pb_grpc.RecommenderStub(channel), case.rpc)
    request = case.build()
    t0 = time.perf_counter()
    try:
        method(request, timeout=timeout_s, metadata=_metadata(case.auth, token))
        got, message = "OK", ""
    except grpc.RpcError as err:
        got, message = err.code().name, (err.details() or "")[:200]
    return Outcome(case.name, case.rpc, list(case.expected), got, (time.perf_counter() - t0) * 1000, message)


def server_alive(channel: grpc.Channel, token: str, timeout_s: float = 30) -> bool:
    """Health SERVING and a plain Recommend answered."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        pb_grpc.RecommenderStub(channel).Recommend(_rec()(), timeout=timeout_s, metadata=_metadata("token", token))
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def seed_base(channel: grpc.Channel, token: str, timeout_s: float = 60.0) -> dict[str, str]:
    """Upsert the base item (later cases refer to it); the server's encoder versions."""
    reply = pb_grpc.RecommenderStub(channel).UpsertItems(upsert_cases()[0].build(), timeout=timeout_s,
                                                         metadata=_metadata("token", token))
    return dict(reply.encoder_versions)


def run_hostile(target: str, token: str = "", dims: dict[str, int] | None = None, timeout_s: float = 60.0,
                select: Callable[[Case], bool] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the suite against `target`; the report's `hostile` section (cases, unexpected, outcomes)."""
    with open_channel(target) as channel:
        ctx = Context(seed_base(channel, token, timeout_s), dict(dims or DEFAULT_DIMS))
        cases = [c for c in all_cases(ctx, bool(token)) if select is None or select(c)]
        names = [c.name for c in cases]
        if len(set(names)) != len(names):
            raise ValueError("hostile case names must be distinct")
        outcomes = []
        for case in cases:
            outcome = call_case(channel, case, token, timeout_s)
            outcomes.append(outcome)
            if log and outcome.unexpected:
                log(f"  UNEXPECTED {outcome.name}: {outcome.got} (expected {'/'.join(outcome.expected)}) "
                    f"{outcome.message}")
        alive = server_alive(channel, token)
    bad = [o for o in outcomes if o.unexpected]
    return {"cases": len(outcomes), "unexpected": len(bad), "server_alive_after_all": alive,
            "rpcs": sorted({o.rpc for o in outcomes}),
            "unexpected_cases": [vars(o) for o in bad], "outcomes": [vars(o) for o in outcomes]}
