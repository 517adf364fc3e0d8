"""The conversations-jsonl format, declared once.

A dataset directory holds ``images/``, one ``<name>_<split>.jsonl`` file per split and, optionally,
``dataset.json`` (:class:`DatasetInfo`). Every line of a jsonl file is one :class:`Record`.

Unknown keys are **rejected** (``extra="forbid"``): a misspelt ``assitant`` is a defect that must be
reported, not silently dropped. Free-form data goes into ``meta``, which every tool ignores.

``python -m phi3v_data.schema --write schemas/`` regenerates the published JSON Schemas;
``--check`` fails when they drift from these models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

#: One path component that is neither ``.`` nor ``..`` and holds no ``/``, ``\`` or NUL.
#: Written without look-arounds so that pydantic-core checks it in Rust (fast path of validate).
_COMPONENT = r"(?:[^/.\\\x00][^/\\\x00]*|\.[^/.\\\x00][^/\\\x00]*|\.\.[^/\\\x00]+)"
#: A relative POSIX path: components joined by single ``/``; no leading ``/``, no ``..``, no ``\``.
RELATIVE_POSIX_PATH = rf"^{_COMPONENT}(?:/{_COMPONENT})*$"

ImagePath = Annotated[
    str,
    StringConstraints(pattern=RELATIVE_POSIX_PATH),
    Field(
        description="Image path relative to the dataset's images/ folder, POSIX separators, "
        "no '..' component, not absolute.",
        examples=["train/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.0.jpg"],
    ),
]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]

#: Default maximum number of images in one record (8 video frames need 8; NLVR2 needs 2).
DEFAULT_MAX_IMAGES_PER_RECORD = 64

#: Keys of the validation context understood by :class:`Record` (``model_validate(..., context=)``).
CTX_MAX_IMAGES = "max_images_per_record"
CTX_UNLABELED = "unlabeled"

#: The placeholder that marks where an image goes in a turn's ``user`` text when ``inline_images``.
IMAGE_PLACEHOLDER = "<image>"


class Turn(BaseModel):
    """One user message (with its images) and the assistant's answer."""

    model_config = ConfigDict(extra="forbid")

    images: list[ImagePath] = Field(
        default_factory=list,
        description="Images shown with this user message, in order; empty for a text-only turn.",
    )
    inline_images: bool = Field(
        default=False,
        strict=True,
        description="When true, the user text holds exactly one '<image>' placeholder per image, "
        "and the k-th placeholder becomes the k-th image's <|image_k|> tag. When false or absent, "
        "all image tags go first, before a newline and the text ('<image>' is then literal text).",
    )
    user: Annotated[str, StringConstraints(min_length=1)] = Field(
        description="The user's text, without <|image_k|> tags (the trainer adds them): images go "
        "first, or at the '<image>' placeholders when inline_images is true."
    )
    assistant: str = Field(
        description="The answer the model must learn. Empty only in a split declared unlabeled "
        "in dataset.json (e.g. a test split without answers)."
    )

    @field_validator("user")
    @classmethod
    def _user_not_blank(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        if info.data.get("inline_images") and "images" in info.data:
            found, wanted = value.count(IMAGE_PLACEHOLDER), len(info.data["images"])
            if found != wanted:
                raise ValueError(
                    f"has {found} {IMAGE_PLACEHOLDER} placeholder(s) but the turn has {wanted} "
                    "image(s); with inline_images each image needs exactly one placeholder"
                )
        return value

    @model_serializer(mode="wrap")
    def _omit_defaults(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """Leave ``inline_images`` out while false, so that older records stay byte-identical."""
        data = handler(self)
        if not self.inline_images:
            data.pop("inline_images", None)
        return data

    @field_validator("assistant")
    @classmethod
    def _assistant_labeled(cls, value: str, info: ValidationInfo) -> str:
        unlabeled = bool(info.context and info.context.get(CTX_UNLABELED))
        if not value.strip() and not unlabeled:
            raise ValueError("is empty, but this split is not declared unlabeled in dataset.json")
        return value


class Record(BaseModel):
    """One example: an id, its source and one or more turns.

    The optional evaluation fields refer to the answer of the **last** turn.
    """

    model_config = ConfigDict(extra="forbid")

    id: NonEmptyStr = Field(description="Unique within the dataset, across all splits.")
    source: NonEmptyStr = Field(description="Where the record comes from, e.g. 'ucf101'.")
    system: str | None = Field(
        default=None,
        description="Optional system prompt. Training and evaluation put it before the first "
        "turn as the official chat template does: '<|system|>\\n{system}<|end|>\\n'. Absent: "
        "no system message (the recipe's layout).",
    )
    conversations: list[Turn] = Field(min_length=1, description="The turns, in order.")
    answers: list[str] | None = Field(
        default=None,
        description="Every acceptable reference answer of the last turn (DocVQA has several; "
        "ANLS takes the best). When absent, the last turn's assistant text is the reference.",
    )
    label: Literal[0, 1] | None = Field(
        default=None,
        description="Binary label of the example (hateful memes: 1 = hateful), used for AUROC.",
    )
    group: str | None = Field(
        default=None,
        description="Consistency group key: examples sharing it are scored together "
        "(NLVR2 consistency is computed over examples sharing a sentence).",
    )
    meta: dict[str, Any] | None = Field(
        default=None, description="Free-form data kept with the record; ignored by every tool."
    )

    @field_validator("system")
    @classmethod
    def _system_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank (leave the key out for no system prompt)")
        return value

    @model_validator(mode="after")
    def _image_count(self, info: ValidationInfo) -> Record:
        limit = DEFAULT_MAX_IMAGES_PER_RECORD
        if info.context and info.context.get(CTX_MAX_IMAGES) is not None:
            limit = int(info.context[CTX_MAX_IMAGES])
        count = sum(len(turn.images) for turn in self.conversations)
        if count > limit:
            raise ValueError(
                f"conversations: {count} images in one record, more than the {limit} allowed"
            )
        return self

    @property
    def images(self) -> list[str]:
        """All image paths of the record, in turn order."""
        return [path for turn in self.conversations for path in turn.images]

    @property
    def references(self) -> list[str]:
        """Reference answers of the last turn (``answers`` or the assistant text)."""
        return list(self.answers) if self.answers else [self.conversations[-1].assistant]


#: num_crops when neither the command line nor dataset.json says (Phi-3.5-vision's own value); the
#: one default used by training, evaluation, validate's token statistics, preview and plan.
DEFAULT_NUM_CROPS = 16
#: Most HD crops per image the model supports.
MAX_NUM_CROPS = 16


class DatasetInfo(BaseModel):
    """Optional ``dataset.json`` at the root of a dataset directory: the task as data.

    Converters write it; a hand-made dataset may omit it (every default below applies).
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="Dataset name (the jsonl prefix).")
    metrics: list[Literal["accuracy", "anls", "auroc", "consistency"]] = Field(
        default_factory=lambda: ["accuracy"],
        description="Metrics the evaluation reports for this dataset.",
    )
    unlabeled_splits: list[str] = Field(
        default_factory=list, description="Splits whose assistant texts may be empty."
    )
    max_images_per_record: int = Field(default=DEFAULT_MAX_IMAGES_PER_RECORD, ge=1)
    answer_words: dict[str, str] | None = Field(
        default=None,
        description="Answer word of each binary label, e.g. {'0': 'no', '1': 'yes'}; AUROC scores "
        "the probability of the word of label 1 at the first answer position.",
    )
    num_crops: int | None = Field(
        default=None,
        ge=1,
        le=MAX_NUM_CROPS,
        description="Suggested num_crops for this data (e.g. 4 for video).",
    )
    converter: dict[str, Any] | None = Field(
        default=None, description="Name and options of the converter that wrote the dataset."
    )


SCHEMA_FILES: dict[str, type[BaseModel]] = {
    "record.schema.json": Record,
    "dataset_info.schema.json": DatasetInfo,
}


def json_schemas() -> dict[str, str]:
    """The published JSON Schema documents, rendered exactly as stored under ``schemas/``."""
    return {
        name: json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in SCHEMA_FILES.items()
    }


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in {"--write", "--check"}:
        print("usage: python -m phi3v_data.schema --write|--check DIR", file=sys.stderr)
        return 2
    mode, folder = argv[0], Path(argv[1])
    stale = []
    for name, text in json_schemas().items():
        path = folder / name
        if mode == "--write":
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        elif not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(str(path))
    if stale:
        print(
            "JSON Schema out of date with phi3v_data.schema: "
            + ", ".join(stale)
            + " (run `make schema`)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
