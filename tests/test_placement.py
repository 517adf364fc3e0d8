"""Images inside the user text and the system prompt: exactly the official template + processor.

The expected ids come from prompt strings written by hand in the official layout (chat template
of ../shared/reference/phi35v/official/tokenizer_config.json) run through the reference processor
with the real Phi-3.5-vision tokenizer; the records go through ``encode_for_training`` /
``encode_for_generation``. A record without the new fields must encode exactly as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data import _official_processor

from phi3v_data.images import load_image
from phi3v_data.schema import Record
from phi3v_train.data import (
    ANSWER_SUFFIX,
    IGNORE_INDEX,
    encode_for_generation,
    encode_for_training,
    turn_content,
)

A, B = "images/rgb_320x240.png", "images/rgb_240x320.png"
SYSTEM_ID, USER_ID, ASSISTANT_ID, BOS = 32006, 32010, 32001, 1


@pytest.fixture(scope="module")
def processor(reference_dir: Path):
    return _official_processor(reference_dir, num_crops=1)


def _hand_ids(processor, prompt: str, answer: str | None, images: list[str], root: Path):
    """Ids of a hand-written prompt (+ answer) through the processor and the tokenizer."""
    pictures = [load_image(root, path) for path in images]
    ids = processor(prompt, images=pictures or None)["input_ids"][0].tolist()
    if answer is not None:
        ids += processor.tokenizer(answer + ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
    return ids


def _turn(user: str, images: list[str], answer: str = "yes", inline: bool = True) -> dict:
    turn = {"images": images, "user": user, "assistant": answer}
    return {**turn, "inline_images": True} if inline else turn


def test_inline_placeholders_become_numbered_tags_in_place() -> None:
    record = Record.model_validate(
        {
            "id": "r",
            "source": "t",
            "conversations": [_turn("Compare <image> with <image>, then <b>.", [A, B])],
        }
    )
    assert turn_content(record.conversations[0]) == (
        "Compare <|image_1|> with <|image_2|>, then <b>."
    )
    after = _turn("What are they doing?<image>", [A])
    assert (
        turn_content(
            Record.model_validate({**record.model_dump(), "conversations": [after]}).conversations[
                0
            ]
        )
        == "What are they doing?<|image_1|>"
    )


def test_inline_images_and_system_prompt_match_the_official_layout(
    processor, reference_dir: Path
) -> None:
    system = "You are a careful assistant."
    record = Record.model_validate(
        {
            "id": "r",
            "source": "t",
            "system": system,
            "conversations": [
                _turn("Compare <image> with <image>.", [A, B], "the left one"),
                _turn("And this one?<image>", [A], "darker"),
                _turn("Thanks.", [], "welcome", inline=False),
            ],
        }
    )
    # The official template renders the system message as <|system|>\n{system}<|end|>\n.
    rendered = processor.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "x"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == f"<|system|>\n{system}<|end|>\n<|user|>\nx<|end|>\n<|assistant|>\n"
    hand = [
        (
            f"<|system|>\n{system}<|end|>\n<|user|>\nCompare <|image_1|> with <|image_2|>."
            "<|end|>\n<|assistant|>\n",
            "the left one",
            [A, B],
        ),
        ("<|user|>\nAnd this one?<|image_1|><|end|>\n<|assistant|>\n", "darker", [A]),
        ("<|user|>\nThanks.<|end|>\n<|assistant|>\n", "welcome", []),
    ]
    expected = [_hand_ids(processor, *turn, reference_dir) for turn in hand]
    example = encode_for_training(record, processor, reference_dir)
    assert example["input_ids"].tolist() == sum(expected, [])
    assert expected[0][:4] == [BOS, SYSTEM_ID, 29871, 13]  # BOS, <|system|>, "\n"
    assert expected[1][:2] == [BOS, USER_ID] and SYSTEM_ID not in expected[1] + expected[2]
    # Image runs follow the placement: text, run -1, text, run -2, text; numbering restarts.
    first = expected[0]
    runs = [value for index, value in enumerate(first) if value < 0 and first[index - 1] >= 0]
    assert runs == [-1, -2] and first.index(-1) > first.index(USER_ID) + 2
    second = expected[1]
    assert min(second) == -1 and second[second.index(-1) - 1] > 0  # text before the image
    supervised = [label for label in example["labels"].tolist() if label != IGNORE_INDEX]
    answers = [
        processor.tokenizer(a + ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
        for a in ("the left one", "darker", "welcome")
    ]
    assert supervised == sum(answers, [])
    assert example["pixel_values"].shape[0] == 3
    # The generation prompt is the training prefix up to the last answer: system prompt included.
    prompt = encode_for_generation(record, processor, reference_dir)
    assert prompt["input_ids"].tolist() == sum(expected, [])[: -len(answers[-1])]


def test_records_without_the_new_fields_encode_as_before(processor, reference_dir: Path) -> None:
    legacy = {"id": "r", "source": "t", "conversations": [_turn("Same?", [A, B], inline=False)]}
    hand = "<|user|>\n<|image_1|><|image_2|>\nSame?<|end|>\n<|assistant|>\n"
    example = encode_for_training(Record.model_validate(legacy), processor, reference_dir)
    assert example["input_ids"].tolist() == _hand_ids(processor, hand, "yes", [A, B], reference_dir)
    # Placeholders written where the tags used to go give the very same ids.
    inline = {**legacy, "conversations": [_turn("<image><image>\nSame?", [A, B])]}
    again = encode_for_training(Record.model_validate(inline), processor, reference_dir)
    assert torch.equal(again["input_ids"], example["input_ids"])
    assert torch.equal(again["pixel_values"], example["pixel_values"])
    # Without inline_images, '<image>' is literal text (tokenized, never an image).
    literal = {**legacy, "conversations": [_turn("What is <image>?", [A], inline=False)]}
    ids = encode_for_training(Record.model_validate(literal), processor, reference_dir)
    text = "<|user|>\n<|image_1|>\nWhat is <image>?<|end|>\n<|assistant|>\n"
    assert ids["input_ids"].tolist() == _hand_ids(processor, text, "yes", [A], reference_dir)
