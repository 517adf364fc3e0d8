"""``phi3v-data convert sharegpt``: LLaMA-Factory's real demo files (images and videos) and OpenAI
chat messages, through validate and one tiny training step."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from image_converter_helpers import (
    assert_converted,
    assert_valid,
    convert,
    image_bytes,
    read_json,
    read_jsonl,
    tree_bytes,
    write_image,
)
from train_helpers import tiny_model, train_in_process
from ucf101_helpers import write_counting_video


def test_llamafactory_demos_with_videos_convert_validate_and_train(
    shared_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    src = shared_dir / "fixtures/raw/llamafactory"  # mllm_demo.json + mllm_video_demo.json
    media = tmp_path / "media"
    for index in (1, 2, 3):
        write_image(media / f"mllm_demo_data/{index}.jpg", fmt="JPEG", seed=index)
    for name in ("1.mp4", "2.avi", "3.mp4"):
        write_counting_video(media / "mllm_demo_data" / name, 10)
    out = tmp_path / "out"

    assert_converted(
        convert("sharegpt", src, out, "--image_folder", str(media), "--num_frames", "2")
    )
    assert_valid(out)
    records = {r["id"]: r for r in read_jsonl(out / "sharegpt_train.jsonl")}
    assert len(records) == 9
    first = records["mllm_demo-0"]["conversations"]
    assert first[0] == {
        "images": ["train/mllm_demo_data/1.jpg"],
        "user": "Who are they?",
        "assistant": "They're Kane and Gretzka from Bayern Munich.",
    }
    assert first[1]["inline_images"] is True  # "What are they doing?<image>" keeps its place
    assert first[1]["user"] == "What are they doing?<image>"
    assert records["mllm_demo-3"]["conversations"][1]["user"] == "他们在做什么？<image>"
    video = records["mllm_video_demo-1"]["conversations"][0]
    assert video["images"] == [
        "train/mllm_demo_data/2.avi.0.jpg",
        "train/mllm_demo_data/2.avi.1.jpg",
    ]
    assert video["user"] == "What is she doing?"
    assert (out / "images/train/mllm_demo_data/1.jpg").read_bytes() == (
        media / "mllm_demo_data/1.jpg"
    ).read_bytes()

    losses = train_in_process(tiny_model(tmp_path_factory), out, tmp_path / "run", max_steps=1)
    assert len(losses) == 1


def _png_uri(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes(seed=seed)).decode()


def _openai(user: list | str, answer: str = "yes", system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def test_openai_messages_data_uris_files_system_and_refused_urls(tmp_path: Path):
    src = tmp_path / "src"
    write_image(src / "pics/cat.png", seed=3)
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    url = lambda u: {"type": "image_url", "image_url": {"url": u}}  # noqa: E731
    rows = [
        _openai([url(_png_uri(1)), text("What is it?")], system="Be brief."),
        _openai([text("Compare "), url("pics/cat.png"), text(" and "), url(_png_uri(1))]),
        _openai([{"type": "image"}, text("Bare block.")]) | {"images": ["pics/cat.png"]},
        _openai("Plain text only.", "fine"),
        _openai([url("https://example.com/cat.png"), text("Remote?")]),
        _openai([url("data:image/png;base64,@@@"), text("Broken?")]),
        _openai([url("pics/../../secret.png"), text("Escape?")]),
        _openai([url("pics/cat.png"), text("No answer")], " "),
        _openai([{"type": "input_audio"}, text("Audio?")]),
    ]
    annotation = src / "chat.jsonl"
    annotation.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    out = tmp_path / "out"

    assert_converted(convert("sharegpt", annotation, out))
    assert_valid(out)
    got = {r["id"]: r for r in read_jsonl(out / "sharegpt_train.jsonl")}
    assert sorted(got) == ["chat-1", "chat-2", "chat-3", "chat-4"]
    one = got["chat-1"]
    assert one["system"] == "Be brief."
    assert one["meta"]["format"] == "openai"
    embedded = one["conversations"][0]["images"]
    assert len(embedded) == 1 and embedded[0].startswith("train/_embedded/")
    assert (out / "images" / embedded[0]).read_bytes() == image_bytes(seed=1)
    two = got["chat-2"]["conversations"][0]
    assert two["images"] == ["train/pics/cat.png", embedded[0]]  # same bytes, stored once
    assert two["inline_images"] is True and two["user"] == "Compare <image> and <image>"
    assert got["chat-3"]["conversations"][0]["images"] == ["train/pics/cat.png"]
    assert got["chat-4"]["conversations"][0] == {
        "images": [],
        "user": "Plain text only.",
        "assistant": "fine",
    }
    reasons = {e["input"]: e["reason"] for e in read_json(out / "convert_report.json")["skipped"]}
    assert "http(s) URL refused, never fetched" in reasons["chat.jsonl:5"]
    assert "\n" not in reasons["chat.jsonl:5"]
    assert "not valid base64" in reasons["chat.jsonl:6"]
    assert "inside the image folder" in reasons["chat.jsonl:7"]
    assert "empty answer" in reasons["chat.jsonl:8"]
    assert "unsupported content block" in reasons["chat.jsonl:9"]
    assert not any((out / "images").rglob("secret.png"))


def test_sharegpt_conversations_system_column_and_forced_format(tmp_path: Path):
    src = tmp_path / "src"
    write_image(src / "a.jpg", fmt="JPEG", seed=5)
    human = lambda v: {"from": "human", "value": v}  # noqa: E731
    gpt = lambda v: {"from": "gpt", "value": v}  # noqa: E731
    rows = [
        {
            "conversations": [human("Describe <image> please"), gpt("a square")],
            "images": ["a.jpg"],
            "system": "You are a captioner.",
        },
        {
            "conversations": [
                {"from": "system", "value": "Sys turn."},
                human("<image>Hi"),
                gpt("hello"),
            ],
            "images": ["a.jpg"],
        },
        {"conversations": [human("<image><image>Two?"), gpt("no")], "images": ["a.jpg"]},
        {"conversations": [human("Hi"), human("Again"), gpt("x")]},
        {"conversations": [human("<image>Hi"), gpt("x")], "images": ["a.jpg"], "audios": ["a.wav"]},
    ]
    (src / "data.json").write_text(json.dumps(rows))
    out = tmp_path / "out"

    assert_converted(convert("sharegpt", src, out))
    assert_valid(out)
    got = {r["id"]: r for r in read_jsonl(out / "sharegpt_train.jsonl")}
    assert got["data-0"]["system"] == "You are a captioner."
    assert got["data-0"]["conversations"][0]["user"] == "Describe <image> please"
    assert got["data-1"]["system"] == "Sys turn."
    assert got["data-1"]["conversations"][0] == {
        "images": ["train/a.jpg"],
        "user": "Hi",
        "assistant": "hello",
    }
    reasons = {e["input"]: e["reason"] for e in read_json(out / "convert_report.json")["skipped"]}
    assert "2 <image> tag(s) but 1 images" in reasons["data.json: record 2"]
    assert "turns out of order" in reasons["data.json: record 3"]
    assert "audio" in reasons["data.json: record 4"]

    rerun = tmp_path / "rerun"
    assert_converted(convert("sharegpt", src, rerun))
    assert tree_bytes(out) == tree_bytes(rerun)
    # --format openai reads string contents as plain text: <image> stays literal, images unused
    forced = tmp_path / "forced"
    (src / "data.json").write_text(json.dumps([_openai("<image>literal")]))
    assert_converted(convert("sharegpt", src, forced, "--format", "openai"))
    assert (
        read_jsonl(forced / "sharegpt_train.jsonl")[0]["conversations"][0]["user"]
        == "<image>literal"
    )
