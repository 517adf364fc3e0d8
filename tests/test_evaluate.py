"""Evaluation on tiny models: generation mechanics in-process, ``phi3v-train eval`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from phi3v_data.dataset import DatasetError
from phi3v_train.data import GenerationCollator, encode_for_generation
from phi3v_train.evaluation import metrics
from phi3v_train.evaluation.evaluate import (
    answer_token_id,
    eval_command,
    evaluate_split,
    generate_batch,
    load_for_inference,
)
from phi3v_train.model.tiny import make_tiny

BIN = Path(sys.executable).parent
PHI3V_TRAIN = str(BIN / "phi3v-train")


# ------------------------------------------------------------------------------------------------
# tiny datasets of the four kinds
# ------------------------------------------------------------------------------------------------


def _image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (shade, 255 - shade, (3 * shade) % 256)).save(path)


def write_dataset(root: Path, name: str, info: dict, records: list[dict], split: str = "val"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"name": name, "num_crops": 1, **info}))
    for record in records:
        for turn in record["conversations"]:
            for image in turn["images"]:
                _image(root / "images" / image, shade=len(image) * 17 % 256)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (root / f"{name}_{split}.jsonl").write_text(lines)
    return root


def _turn(images: list[str], user: str, assistant: str) -> dict:
    return {"images": images, "user": user, "assistant": assistant}


def ucf_like(root: Path) -> Path:
    classes = ["Archery", "Basketball", "BenchPress"]
    records = [
        {
            "id": f"val-{i}",
            "source": "ucf101",
            "conversations": [
                _turn(
                    [f"val/{c}/v{i}.{k}.jpg" for k in range(2)],
                    "Classify the video into one of the following classes: "
                    + ", ".join(classes)
                    + ".",
                    c,
                )
            ],
        }
        for i, c in enumerate(classes)
    ]
    return write_dataset(root, "ucf", {"metrics": ["accuracy"]}, records)


def docvqa_like(root: Path) -> Path:
    records = [
        {
            "id": f"q{i}",
            "source": "docvqa",
            "conversations": [_turn([f"doc{i}.png"], f"What is field {i}?\nAnswer briefly.", a[0])],
            "answers": a,
        }
        for i, a in enumerate([["1/8/93"], ["University of California", "UC"], ["p. carter"]])
    ]
    return write_dataset(root, "docvqa", {"metrics": ["anls"]}, records)


def memes_like(root: Path) -> Path:
    records = [
        {
            "id": f"{i:05d}",
            "source": "hateful_memes",
            "conversations": [_turn([f"img/{i:05d}.png"], f"meme {i}: is it hateful?", word)],
            "label": label,
        }
        for i, (word, label) in enumerate([("yes", 1), ("no", 0), ("no", 0), ("yes", 1)])
    ]
    info = {"metrics": ["auroc"], "answer_words": {"0": "no", "1": "yes"}}
    return write_dataset(root, "hm", info, records, split="dev_seen")


def nlvr2_like(root: Path) -> Path:
    records = [
        {
            "id": f"dev-{s}-{p}-0",
            "source": "nlvr2",
            "conversations": [
                _turn(
                    [f"dev/dev-{s}-{p}-img0.png", f"dev/dev-{s}-{p}-img1.png"],
                    f"Sentence {s}. True or False?",
                    answer,
                )
            ],
            "group": f"dev-{s}--0",
        }
        for s, p, answer in [(1, 0, "True"), (1, 1, "False"), (2, 0, "True")]
    ]
    info = {"metrics": ["accuracy", "consistency"]}
    return write_dataset(root, "nlvr2", info, records, split="dev")


KINDS = {
    "accuracy": (ucf_like, "val", ["accuracy"]),
    "anls": (docvqa_like, "val", ["anls"]),
    "auroc": (memes_like, "dev_seen", ["accuracy", "auroc"]),
    "consistency": (nlvr2_like, "dev", ["accuracy", "consistency"]),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    return load_for_inference(tiny_dir, num_crops=1)


# ------------------------------------------------------------------------------------------------
# generation mechanics
# ------------------------------------------------------------------------------------------------


def _prompt_batch(processor, records, images_dir: Path):
    encoded = [encode_for_generation(record, processor, images_dir) for record in records]
    return encoded, GenerationCollator(processor.tokenizer.pad_token_id)(encoded)


def test_left_padded_batch_equals_one_by_one(tiny, tmp_path: Path) -> None:
    """Batching with left padding changes neither the predictions nor P(positive word)."""
    model, processor = tiny
    data_dir = memes_like(tmp_path / "hm")
    batched = evaluate_split(model, processor, data_dir, "dev_seen", batch_size=4, max_new_tokens=6)
    single = evaluate_split(model, processor, data_dir, "dev_seen", batch_size=1, max_new_tokens=6)
    assert [e.prediction for e in batched.examples] == [e.prediction for e in single.examples]
    for one, other in zip(batched.examples, single.examples, strict=True):
        assert one.positive_prob == pytest.approx(other.positive_prob, rel=1e-4, abs=1e-7)
    assert batched.metrics == pytest.approx(single.metrics)


def test_positive_probability_is_the_first_answer_position(tiny, tmp_path: Path) -> None:
    """P(yes) from the first generation step equals a plain forward pass over the prompt."""
    model, processor = tiny
    data_dir = memes_like(tmp_path / "hm")
    result = evaluate_split(model, processor, data_dir, "dev_seen", batch_size=4, max_new_tokens=2)
    from phi3v_data.dataset import read_split

    records = read_split(data_dir, "dev_seen")
    yes = processor.tokenizer("yes", add_special_tokens=False).input_ids[0]
    for record, example in zip(records, result.examples, strict=True):
        encoded = encode_for_generation(record, processor, data_dir / "images")
        with torch.inference_mode():
            logits = model(
                input_ids=encoded["input_ids"][None],
                pixel_values=encoded["pixel_values"],
                image_sizes=encoded["image_sizes"],
            ).logits
        expected = logits[0, -1].float().softmax(-1)[yes].item()
        assert example.positive_prob == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("stop_token", ["<|end|>", "<|endoftext|>"])
def test_generation_stops_at_end_tokens(tiny, tmp_path: Path, stop_token: str) -> None:
    """Force the stop token at the 3rd step: exactly 3 new tokens, and the text holds 2."""
    model, processor = tiny
    tokenizer = processor.tokenizer
    stop_id = tokenizer.convert_tokens_to_ids(stop_token)
    data_dir = ucf_like(tmp_path / "ucf")
    from phi3v_data.dataset import read_split

    records = read_split(data_dir, "val")[:2]
    _, batch = _prompt_batch(processor, records, data_dir / "images")
    calls = {"n": 0}
    # the two tokens before the stop: ordinary pieces, never special
    forced = [tokenizer("a", add_special_tokens=False).input_ids[-1]] * 2

    def force(_module, _inputs, output):
        step = calls["n"]
        calls["n"] += 1
        wanted = forced[step] if step < 2 else stop_id
        output = output.clone()
        output[:, -1, :] = -1e4
        output[:, -1, wanted] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(force)
    try:
        texts, _ = generate_batch(model, tokenizer, batch, max_new_tokens=10)
    finally:
        handle.remove()
    assert calls["n"] == 3  # stopped at the stop token, not at max_new_tokens
    expected = tokenizer.decode(forced, skip_special_tokens=True)
    assert texts == [expected, expected]


# ------------------------------------------------------------------------------------------------
# evaluate_split results and errors
# ------------------------------------------------------------------------------------------------


def test_result_json_and_table(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    data_dir = nlvr2_like(tmp_path / "nlvr2")
    result = evaluate_split(model, processor, data_dir, "dev", batch_size=2, max_new_tokens=3)
    out = tmp_path / "out" / "eval.json"
    result.write_json(out)
    data = json.loads(out.read_text())
    assert [e["id"] for e in data["examples"]] == ["dev-1-0-0", "dev-1-1-0", "dev-2-0-0"]
    assert data["examples"][0]["references"] == ["True"]
    assert data["examples"][0]["group"] == "dev-1--0"
    assert set(data["metrics"]) == {"accuracy", "consistency"}
    assert [path.name for path in out.parent.iterdir()] == ["eval.json"]  # no temporary left
    table = result.format_table()
    assert "accuracy" in table and "consistency" in table and "3 examples" in table


def test_max_samples_and_metric_override(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    data_dir = docvqa_like(tmp_path / "docvqa")
    result = evaluate_split(
        model, processor, data_dir, "val", max_samples=2, max_new_tokens=2, metrics=["accuracy"]
    )
    assert len(result.examples) == 2
    assert list(result.metrics) == ["accuracy"]


def test_auroc_without_answer_words_names_the_file(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    data_dir = memes_like(tmp_path / "hm")
    info = json.loads((data_dir / "dataset.json").read_text())
    del info["answer_words"]
    (data_dir / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"dataset\.json:0: answer_words: auroc needs"):
        evaluate_split(model, processor, data_dir, "dev_seen", max_new_tokens=1)


def test_auroc_without_label_names_the_line(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    data_dir = memes_like(tmp_path / "hm")
    path = data_dir / "hm_dev_seen.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[2])
    del record["label"]
    lines[2] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"hm_dev_seen\.jsonl:3: label: auroc needs a label"):
        evaluate_split(model, processor, data_dir, "dev_seen", max_new_tokens=1)


# ------------------------------------------------------------------------------------------------
# phi3v-train eval, end to end (subprocess)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_runs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``phi3v-train eval`` on the four dataset kinds, as four concurrent subprocesses."""
    root = tmp_path_factory.mktemp("eval_runs")
    started = {}
    for kind, (build, split, _) in KINDS.items():
        data_dir = build(root / kind)
        out = root / f"{kind}_out" / f"eval_{split}.json"
        command = [PHI3V_TRAIN, "eval", "--model_name_or_path", str(tiny_dir)]
        command += ["--data_dir", str(data_dir), "--split", split, "--eval_batch_size", "2"]
        process = subprocess.Popen(
            [*command, "--max_new_tokens", "4", "--output_dir", str(out.parent)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[kind] = (process, out)
    runs: dict = {"tiny_dir": tiny_dir}
    for kind, (process, out) in started.items():
        stdout, stderr = process.communicate(timeout=600)
        runs[kind] = (process.returncode, stdout, stderr, out)
    return runs


@pytest.mark.parametrize("kind", list(KINDS))
def test_eval_command_on_each_dataset_kind(eval_runs: dict, kind: str) -> None:
    _, _, expected_metrics = KINDS[kind]
    returncode, stdout, stderr, out = eval_runs[kind]
    assert returncode == 0, stderr
    assert "Warning" not in stderr + stdout  # no deprecation noise from the stack (5.24 port)
    assert "deprecated" not in stderr  # the training names are the current ones
    for name in expected_metrics:
        assert name in stdout
    assert f"wrote {out}" in stdout
    data = json.loads(out.read_text())
    assert list(data["metrics"]) == expected_metrics
    examples = data["examples"]
    predictions = [e["prediction"] for e in examples]
    references = [e["references"] for e in examples]
    # the written metrics are the metric functions applied to the written examples
    if "accuracy" in expected_metrics:
        assert data["metrics"]["accuracy"] == pytest.approx(
            metrics.accuracy(predictions, references)
        )
    if kind == "anls":
        assert data["metrics"]["anls"] == pytest.approx(metrics.anls(predictions, references))
        assert [e["score"] for e in examples] == [
            pytest.approx(metrics.anls_score(p, r))
            for p, r in zip(predictions, references, strict=True)
        ]
    if kind == "auroc":
        probabilities = [e["positive_prob"] for e in examples]
        assert all(0.0 < p < 1.0 for p in probabilities)
        labels = [e["label"] for e in examples]
        assert data["metrics"]["auroc"] == pytest.approx(metrics.auroc(labels, probabilities))
    if kind == "consistency":
        groups = [e["group"] for e in examples]
        scores = [e["score"] for e in examples]
        assert data["metrics"]["consistency"] == pytest.approx(metrics.consistency(groups, scores))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--split", "test"], "no split 'test' (found: val)"),
        (["--split", "val", "--metrics", "bleu"], "unknown metric 'bleu'"),
        (["--split", "val", "--adapter", "."], ".: adapter_config.json not found"),
    ],
)
def test_eval_command_bad_input_one_line(
    tiny_dir: Path, tmp_path: Path, arguments: list[str], message: str
) -> None:
    data_dir = ucf_like(tmp_path / "ucf")
    result = CliRunner().invoke(
        eval_command,
        ["--model_name_or_path", str(tiny_dir), "--data_dir", str(data_dir), *arguments],
    )
    assert result.exit_code != 0
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


def test_eval_under_torchrun_shards_and_gathers(eval_runs: dict, tmp_path: Path) -> None:
    """Two CPU ranks (gloo) give the same per-example results as one process, in dataset order."""
    single_code, _, stderr, single_out = eval_runs["auroc"]
    assert single_code == 0, stderr
    single = json.loads(single_out.read_text())
    data_dir = single_out.parent.parent / "auroc"
    out = tmp_path / "eval_dev_seen.json"
    run = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", PHI3V_TRAIN]
        + ["eval", "--model_name_or_path", str(eval_runs["tiny_dir"]), "--data_dir", str(data_dir)]
        + ["--split", "dev_seen", "--eval_batch_size", "2", "--max_new_tokens", "4"]
        + ["--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # only rank 0 prints and writes
    both = json.loads(out.read_text())
    assert [e["id"] for e in both["examples"]] == [e["id"] for e in single["examples"]]
    assert [e["prediction"] for e in both["examples"]] == [
        e["prediction"] for e in single["examples"]
    ]
    for mine, theirs in zip(both["examples"], single["examples"], strict=True):
        assert mine["positive_prob"] == pytest.approx(theirs["positive_prob"], rel=1e-4)
    assert both["metrics"] == pytest.approx(single["metrics"])


def test_deprecated_spellings_still_work_and_each_says_so_in_one_line(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """--model, --batch_size, --max_samples and --out (a file) give what the training names give."""
    data_dir = ucf_like(tmp_path / "ucf")
    common = ["--data_dir", str(data_dir), "--split", "val", "--max_new_tokens", "2"]
    new = CliRunner().invoke(
        eval_command,
        [*common, "--model_name_or_path", str(tiny_dir), "--eval_batch_size", "2"]
        + ["--eval_max_samples", "2", "--output_dir", str(tmp_path / "new")],
    )
    assert new.exit_code == 0, new.output
    assert "deprecated" not in new.stderr
    old_out = tmp_path / "old.json"
    old = CliRunner().invoke(
        eval_command,
        [*common, "--model", str(tiny_dir), "--batch_size", "2", "--max_samples", "2"]
        + ["--out", str(old_out)],
    )
    assert old.exit_code == 0, old.output
    notes = [line for line in old.stderr.splitlines() if "deprecated" in line]
    assert notes == [
        "note: --model is deprecated; use --model_name_or_path",
        "note: --batch_size is deprecated; use --eval_batch_size",
        "note: --max_samples is deprecated; use --eval_max_samples",
        "note: --out FILE is deprecated; use --output_dir DIR (DIR/eval_<split>.json)",
    ]
    written = json.loads((tmp_path / "new" / "eval_val.json").read_text())
    assert json.loads(old_out.read_text()) == written
    assert written["num_examples"] == 2
    assert "--model" not in CliRunner().invoke(eval_command, ["--help"]).output.replace(
        "--model_name_or_path", ""
    )


@pytest.mark.parametrize(
    ("given", "in_dataset", "expected"), [(None, None, 16), (None, 4, 4), (2, 4, 2)]
)
def test_eval_resolves_num_crops_as_training_does(
    tmp_path: Path, monkeypatch, given: int | None, in_dataset: int | None, expected: int
) -> None:
    """--num_crops, else dataset.json's, else the shared default: training's own rule."""
    from phi3v_data.dataset import load_info
    from phi3v_train.evaluation import evaluate
    from phi3v_train.training.run_plan import resolve_num_crops

    data_dir = ucf_like(tmp_path / "ucf")
    info = json.loads((data_dir / "dataset.json").read_text())
    info.pop("num_crops")
    if in_dataset is not None:
        info["num_crops"] = in_dataset
    (data_dir / "dataset.json").write_text(json.dumps(info))
    seen = []

    def capture(model, **options):
        seen.append(options["num_crops"])
        raise evaluate.LoadingError("captured")

    monkeypatch.setattr(evaluate, "load_for_inference", capture)
    arguments = ["--data_dir", str(data_dir), "--split", "val", "--output_dir", str(tmp_path)]
    arguments += [] if given is None else ["--num_crops", str(given)]
    result = CliRunner().invoke(eval_command, arguments)
    assert result.exit_code == 1 and "captured" in result.output
    assert seen == [expected] == [resolve_num_crops(given, load_info(data_dir))]


@pytest.mark.gpu
def test_cuda_evaluation_matches_cpu(tiny_dir: Path, tmp_path: Path) -> None:
    """Inputs follow the model to the GPU; P(positive word) there equals the CPU's (float32).

    Predictions are not compared: a random tiny model has near-ties that may flip across devices.
    """
    data_dir = memes_like(tmp_path / "hm")
    results = []
    for device in ("cpu", "cuda"):
        model, processor = load_for_inference(tiny_dir, num_crops=1, device=device)
        results.append(evaluate_split(model, processor, data_dir, "dev_seen", max_new_tokens=4))
    cpu, cuda = results
    assert len(cuda.examples) == len(cpu.examples) == 4
    for on_gpu, on_cpu in zip(cuda.examples, cpu.examples, strict=True):
        assert on_gpu.positive_prob == pytest.approx(on_cpu.positive_prob, rel=1e-3)


def test_auroc_reads_the_token_training_supervises_first(reference_dir: Path, tmp_path: Path):
    """With the official tokenizer, P(positive word) is read at the first supervised answer id."""
    from transformers import AutoProcessor

    from phi3v_data.schema import Record
    from phi3v_train.data import IGNORE_INDEX, encode_for_training

    processor = AutoProcessor.from_pretrained(reference_dir / "official", num_crops=1)
    _image(tmp_path / "images" / "m.png", shade=10)
    for word in ("yes", "no", "hateful"):
        record = Record.model_validate(
            {"id": "m", "source": "t", "conversations": [_turn(["m.png"], "Hateful?", word)]}
        )
        labels = encode_for_training(record, processor, tmp_path / "images")["labels"]
        first_answer_id = int(labels[labels != IGNORE_INDEX][0])
        assert answer_token_id(processor.tokenizer, word) == first_answer_id


def test_unlabeled_split_gets_predictions_only(tiny, tmp_path: Path) -> None:
    """A split declared unlabeled (e.g. DocVQA test) is predicted for submission, not scored."""
    model, processor = tiny
    records = [
        {"id": f"t{i}", "source": "docvqa", "conversations": [_turn([f"t{i}.png"], "Total?", "")]}
        for i in range(3)
    ]
    data_dir = write_dataset(
        tmp_path / "docvqa",
        "docvqa",
        {"metrics": ["anls"], "unlabeled_splits": ["test"]},
        records,
        split="test",
    )
    result = evaluate_split(model, processor, data_dir, "test", batch_size=2, max_new_tokens=3)
    assert result.metrics == {}
    assert "predictions only" in result.format_table()
    result.write_json(tmp_path / "test.json")
    data = json.loads((tmp_path / "test.json").read_text())
    assert [sorted(e) for e in data["examples"]] == [["id", "prediction", "references"]] * 3
    assert data["metrics"] == {} and data["score"] is None
