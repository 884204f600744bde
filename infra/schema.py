"""Event schemas: what travels on each topic, validated on the way in and on the way out.

Every message is JSON encoded by msgspec (see ``bench/replay.py`` for the measured cost).
Decoding is strict: a wrong type, a missing field, an unknown event shape or an oversize
message raises :class:`SchemaError` with a human-readable reason, which the caller routes
to the dead-letter topic (:mod:`ctr.infra.deadletter`) together with the original bytes.

>>> imp = Impression(event_id="i1", event_time_ms=1_700_000_000_000, user_id="u1",
...                  item_id="ad7", position=0, categorical={"site": "news"}, numeric={"I1": 3.0})
>>> decode_impression(encode(imp)) == imp
True
>>> decode_click(b'{"impression_id": "i1"}')  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
...
ctr.infra.schema.SchemaError: Object missing required field `event_time_ms`
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, TypeVar

import msgspec

#: Header of a watermark control message on impressions/clicks (empty value): "event time on
#: this partition has reached <ms>". Sent by a replay after its last event; decoders skip it.
WATERMARK_HEADER = "ctr.watermark"
#: Largest message any decoder accepts; bigger ones are dead-lettered unread.
MAX_MESSAGE_BYTES = 64 * 1024
#: Bounds that keep one event from blowing up downstream memory (feature dicts, hashing).
MAX_FIELDS = 256
MAX_ID_LEN = 256

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]
Value = Annotated[str, msgspec.Meta(max_length=MAX_ID_LEN)]
FieldName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
EventTimeMs = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class SchemaError(ValueError):
    """A message that does not match its schema; ``str(err)`` is the reason."""


class Impression(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An ad/item shown to a user. Keyed on Kafka by ``event_id``."""

    event_id: Id
    event_time_ms: EventTimeMs
    user_id: Id
    item_id: Id
    position: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    categorical: Annotated[dict[FieldName, Value], msgspec.Meta(max_length=MAX_FIELDS)] = {}
    numeric: Annotated[dict[FieldName, float], msgspec.Meta(max_length=MAX_FIELDS)] = {}
    #: Ground-truth click probability; set only by the synthetic generator so reports can
    #: state the best achievable AUC. Learners and servers must never read it.
    oracle_ctr: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None


class Click(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A click on an earlier impression. Keyed by ``impression_id`` so it lands on the
    impression's partition (the label join is partition-local)."""

    impression_id: Id
    event_time_ms: EventTimeMs


class TrainingExample(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An impression with its label. ``example_id`` equals the impression's ``event_id``: a
    replayed duplicate has the same key.

    With the join's default emission (``provisional``) an impression leaves at once, as a
    *provisional* negative unless already clicked; a click inside the attribution window then
    sends a *correction*: the same impression again with label 1 (same key, so it follows its
    first example on the same partition). Per impression: exactly one first example, plus
    one correction iff the click came after the first left. Its final label is 1 iff it was
    emitted positive or corrected."""

    example_id: Id
    label: Annotated[int, msgspec.Meta(ge=0, le=1)]
    impression: Impression
    click_time_ms: EventTimeMs | None = None
    #: a negative sent before the window closed: a correction may still follow
    provisional: bool = False
    #: the click of an impression sent earlier as a provisional negative (label 1)
    correction: bool = False


class FieldWeights(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-field importance published by the reweighting agent on ``field-weights``.

    ``weights`` are normalised to mean 1 over the fields (a multiplier the learner's field gate
    applies); ``importance`` is the raw score (OutRank-normalised mutual information) and
    ``psi`` the drift of each field between the last two windows. ``version`` increases by one
    per publication; consumers ignore anything not newer than what they hold.
    """

    version: Annotated[int, msgspec.Meta(ge=0)]
    computed_at_ms: EventTimeMs
    #: Event time of the newest example in the window the weights were computed from.
    event_time_ms: EventTimeMs
    window_examples: Annotated[int, msgspec.Meta(ge=0)] = 0
    weights: Annotated[dict[FieldName, Annotated[float, msgspec.Meta(ge=0.0)]], msgspec.Meta(max_length=MAX_FIELDS)]
    importance: dict[FieldName, float] = {}
    psi: dict[FieldName, float] = {}


class ServedScore(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What serving predicted for an impression, and with which version: logged on
    ``served-scores`` (keyed by ``impression_id``) when a /predict candidate names its
    impression, so the learner can join it to the impression's label -- the online quality of
    what was actually served, not of the learner's own predict-then-learn scores."""

    impression_id: Id
    model_id: Id
    version: Annotated[int, msgspec.Meta(ge=0)]
    p_click: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    served_at_ms: EventTimeMs


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message some stage could not process: the reason, where it came from, the bytes."""

    reason: str
    source_topic: str
    stage: str
    original: bytes  # base64 in JSON
    partition: int | None = None
    offset: int | None = None
    failed_at_ms: int = 0


_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def encode(event: msgspec.Struct) -> bytes:
    """Serialise any schema struct to JSON bytes, refusing oversize output."""
    data = _encoder.encode(event)
    if len(data) > MAX_MESSAGE_BYTES:
        raise SchemaError(f"encoded {type(event).__name__} is {len(data)} bytes > {MAX_MESSAGE_BYTES}")
    return data


def _decoder(kind: type[T]) -> Any:
    dec = msgspec.json.Decoder(kind)

    def decode(data: bytes | bytearray | memoryview | None) -> T:
        if data is None:
            raise SchemaError("empty message (null value)")
        if len(data) > MAX_MESSAGE_BYTES:
            raise SchemaError(f"message is {len(data)} bytes > {MAX_MESSAGE_BYTES}")
        try:
            return dec.decode(data)
        except msgspec.ValidationError as err:
            raise SchemaError(str(err)) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as err:
            raise SchemaError(f"malformed JSON: {err}") from None

    decode.__doc__ = f"Decode and validate one :class:`{kind.__name__}`; raises :class:`SchemaError`."
    return decode


decode_impression = _decoder(Impression)
decode_click = _decoder(Click)
decode_training_example = _decoder(TrainingExample)
decode_field_weights = _decoder(FieldWeights)
decode_served_score = _decoder(ServedScore)


def final_labels(examples: Iterable[TrainingExample]) -> dict[str, int]:
    """Each impression's final label from the examples the join sent, in any emission mode and
    any order, re-delivered duplicates included: 1 iff it was sent positive or corrected.
    Raises :class:`ValueError` where the examples contradict each other (two different first
    examples, or a correction of an impression whose first example is missing or was final).

    >>> imp = Impression(event_id="e1", event_time_ms=0, user_id="u", item_id="i")
    >>> first = TrainingExample(example_id="e1", label=0, impression=imp, provisional=True)
    >>> fix = TrainingExample(example_id="e1", label=1, impression=imp, correction=True)
    >>> final_labels([first, fix, first])
    {'e1': 1}
    """
    firsts: dict[str, tuple[int, bool]] = {}
    corrected: set[str] = set()
    for e in examples:
        if e.correction:
            corrected.add(e.example_id)
            continue
        seen = firsts.setdefault(e.example_id, (e.label, e.provisional))
        if seen != (e.label, e.provisional):
            raise ValueError(f"{e.example_id}: two different first examples {seen} and {(e.label, e.provisional)}")
    for eid in corrected:
        if firsts.get(eid, (1, False)) != (0, True):
            raise ValueError(f"{eid}: a correction without a provisional negative before it")
    return {eid: 1 if eid in corrected else label for eid, (label, _) in firsts.items()}
