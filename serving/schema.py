"""``/predict`` and admin request and response types (msgspec for the hot request, pydantic for
the OpenAPI document)."""

from typing import Annotated, Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field

# The request is decoded AND validated by msgspec in one pass (several times cheaper than
# json.loads + pydantic); its JSON schema is put into the OpenAPI document.
FieldName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Value = Annotated[str, msgspec.Meta(max_length=256)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: Finite only: JSON has no NaN/Infinity tokens, and 1e400 (-> inf) is out of this range.
Num = Annotated[float, msgspec.Meta(ge=-1.7e308, le=1.7e308)]
Fields = Annotated[dict[FieldName, Value], msgspec.Meta(max_length=256)]
Numerics = Annotated[dict[FieldName, Num], msgspec.Meta(max_length=256)]


class Context(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Request-level fields shared by every candidate (site, device, hour...)."""

    categorical: Fields = {}
    numeric: Numerics = {}


class Candidate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One item/ad to score; its fields override the context's fields of the same name."""

    item_id: Id
    #: Slot; default: the candidate's index in the list.
    position: Annotated[int, msgspec.Meta(ge=0, le=10_000)] | None = None
    categorical: Fields = {}
    numeric: Numerics = {}
    #: The impression this candidate will be shown as: its score and version are logged on
    #: ``served-scores`` so the learner can measure the served model's online quality.
    impression_id: Id | None = None


def request_type(max_candidates: int) -> type[msgspec.Struct]:
    return msgspec.defstruct(
        "PredictRequest",
        [("user_id", Id), ("context", Context, msgspec.field(default_factory=Context)),
         ("candidates", Annotated[list[Candidate], msgspec.Meta(min_length=1, max_length=max_candidates)]),
         ("request_id", Annotated[str, msgspec.Meta(max_length=128)] | None, None)],
        forbid_unknown_fields=True, kw_only=True)


class LazyCandidate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """:class:`Candidate` with its ``categorical`` object left as raw JSON (syntax checked),
    read by :class:`ctr.serving.candidate_fields.CandidateFields` or, if that declines,
    decoded again as :class:`Candidate`."""

    item_id: Id
    position: Annotated[int, msgspec.Meta(ge=0, le=10_000)] | None = None
    categorical: msgspec.Raw = msgspec.Raw(b"")
    numeric: Numerics = {}
    impression_id: Id | None = None


def lazy_request_type(max_candidates: int) -> type[msgspec.Struct]:
    """:func:`request_type` with :class:`LazyCandidate` candidates."""
    return msgspec.defstruct(
        "LazyPredictRequest",
        [("user_id", Id), ("context", Context, msgspec.field(default_factory=Context)),
         ("candidates", Annotated[list[LazyCandidate], msgspec.Meta(min_length=1, max_length=max_candidates)]),
         ("request_id", Annotated[str, msgspec.Meta(max_length=128)] | None, None)],
        forbid_unknown_fields=True, kw_only=True)


EXAMPLE_REQUEST = {"user_id": "u42",
            "context": {"categorical": {"site": "news", "device": "mobile"}, "numeric": {"hour": 13}},
            "candidates": [{"item_id": "ad7", "categorical": {"campaign": "c1"}}, {"item_id": "ad9", "position": 1}]}


class Prediction(BaseModel):
    item_id: str
    position: int
    p_click: float = Field(description="Click probability (sigmoid of the model's logit)")


class PredictResponse(BaseModel):
    model_id: str
    model_version: int = Field(description="The version that scored every candidate of this response")
    model_event_time_ms: int = Field(description="Newest event time that version was trained on (freshness)")
    predictions: list[Prediction]
    request_id: str | None = None
    features: dict[str, Any] = Field(description="Where the features came from: cache hits, Feast misses, ms")
    explain: dict[str, Any] | None = None


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(default=None, ge=0, description="A kept version; default: the one before the current")
    model_id: str | None = Field(default=None, description="Lineage (default: the current one)")


class Problem(BaseModel):
    detail: Any
