"""The built-in tiny Phi-3.5-vision preset: `make_tiny(out_dir, seed)` / `phi3v-train make-tiny DIR`.

It writes an ordinary model directory (config.json, model.safetensors, generation_config.json,
tokenizer.json + tokenizer_config.json + special_tokens_map.json, preprocessor_config.json,
processor_config.json) that every command accepts as `--model_name_or_path`, with no download.

Tiny architecture (same structure as Phi-3.5-vision, shrunk so a CPU training step is fast):
- decoder: hidden 64, intermediate 128, 2 layers, 4 heads (head_dim 16), RMSNorm eps 1e-5,
  LongRoPE "su" with 8 short / 8 long factors, original_max_position_embeddings 4096 and
  max_position_embeddings 131072 as in the official config (so the long regime starts at the same
  length), vocab_size = tokenizer size rounded up to a multiple of 64;
- vision: CLIP ViT with image 336 / patch 14 (the HD transform and the 144-tokens-per-crop layout
  need them), hidden 32, intermediate 64, 3 layers, 4 heads, quick_gelu; image_dim_out 32;
- projector: Linear 128 -> 64, GELU, Linear 64 -> 64; learnable `glb_GN` / `sub_GN`.
- weights: transformers' initialisation (std 0.02) under `torch.manual_seed(seed)`: the same seed
  gives byte-identical files.

Tiny tokenizer (built offline with `tokenizers`, deterministic): a SentencePiece-style byte-fallback
BPE like the official one (normalizer: prepend "▁", spaces -> "▁"; no pre-tokenizer; BOS added by
the post-processor; the same decoder), trained in memory on a small built-in English corpus:
`<unk>`=0, `<s>`=1, `</s>`=2, the 256 byte tokens `<0x00>`..`<0xFF>`, ~740 learned pieces, then the
official added tokens in the official order (`<|endoftext|>` first = eos and pad, `<|assistant|>`,
`<|placeholder1..4|>`, `<|system|>`, `<|end|>`, `<|placeholder5..6|>`, `<|user|>`,
`<|placeholder7..39|>`, `<|image|>`) with the same flags, and the official chat template.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import click
import torch

from phi3v_data.safe_io import describe_os_error

TINY_BASE_VOCAB = 1000
NUM_CROPS = 4

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
    "'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)


def official_added_tokens() -> list[tuple[str, bool]]:
    """(content, rstrip) of the tokens the official tokenizer adds after its base vocabulary."""
    placeholders = [f"<|placeholder{i}|>" for i in range(1, 40)]
    order = ["<|endoftext|>", "<|assistant|>", *placeholders[:4], "<|system|>", "<|end|>"]
    order += [*placeholders[4:6], "<|user|>", *placeholders[6:], "<|image|>"]
    rstrip = {"<|assistant|>", "<|image|>", *placeholders}
    return [(token, token in rstrip) for token in order]


# A small built-in English corpus: the recipe's prompts plus generic descriptive sentences.
_CORPUS_SENTENCES = [
    "Classify the video into one of the following classes: {classes}. Answer with the class name.",
    "What is shown in the image? Answer briefly.",
    "Is this statement about the two images true or false? Answer yes or no.",
    "Is the meme hateful? Answer yes or no.",
    "What is the date written at the top of the document?",
    "What is the total amount on the invoice? The total amount is {number} dollars.",
    "The person in the video is {action} in a {place}.",
    "There are {number} {things} in the {place}, and one of them is {color}.",
    "The left image shows a {color} {thing} and the right image shows two {things}.",
    "A man is {action} near the {place} while a woman is watching.",
    "The document is a letter from the company to the director about the annual report.",
    "Please read the table and answer the question with a single word or number.",
    "The answer is {answer}.",
    "Yes, the statement is true. No, the statement is false.",
    "This is a photo of a {color} {thing} on a table next to a window.",
]
_WORDS = {
    "classes": [
        "ApplyEyeMakeup, Archery, BabyCrawling, Basketball, Biking, Bowling",
        "CuttingInKitchen, Diving, Drumming, Fencing, GolfSwing, Haircut",
        "HorseRiding, JumpRope, Knitting, PlayingGuitar, PlayingPiano, Punch",
        "Rowing, Skiing, SkyDiving, SoccerPenalty, Surfing, Swing, TennisSwing",
        "Typing, WalkingWithDog, WritingOnBoard, YoYo, PushUps, PullUps",
    ],
    "number": ["one", "two", "three", "four", "five", "12", "2024", "345.67", "1,250", "0.5"],
    "action": ["running", "playing the guitar", "riding a horse", "swimming", "typing", "cooking"],
    "place": ["park", "kitchen", "street", "office", "garden", "stadium", "room", "river"],
    "things": ["dogs", "cars", "books", "people", "chairs", "birds", "pages", "tables"],
    "thing": ["dog", "car", "book", "person", "chair", "bird", "page", "table"],
    "color": ["red", "blue", "green", "white", "black", "yellow"],
    "answer": ["yes", "no", "true", "false", "Archery", "the director", "March 3, 1998"],
}


def tiny_corpus() -> list[str]:
    """Deterministic sentences: every template filled with rotating word choices."""
    lines = []
    for round_index in range(12):
        for template_index, template in enumerate(_CORPUS_SENTENCES):
            values = {
                key: words[(round_index * 7 + template_index * 3) % len(words)]
                for key, words in _WORDS.items()
            }
            lines.append(template.format(**values))
    return lines


def build_tiny_tokenizer():
    """The tiny fast tokenizer (a `PreTrainedTokenizerFast`), built offline and deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    fixed = len(specials) + len(byte_tokens)

    # 1. Learn pieces and merges on the corpus (words split before each "▁", as SentencePiece).
    trainer_model = Tokenizer(BPE(unk_token="<unk>"))
    trainer_model.normalizer = normalizer
    trainer_model.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = BpeTrainer(vocab_size=TINY_BASE_VOCAB - fixed, show_progress=False)
    trainer_model.train_from_iterator(tiny_corpus(), trainer=trainer)
    learned = json.loads(trainer_model.to_str())["model"]
    pieces = sorted(learned["vocab"].items(), key=lambda item: item[1])

    # 2. The official layout: specials, byte fallback tokens, learned pieces (padded to the size).
    vocab = {token: index for index, token in enumerate(specials + byte_tokens)}
    for piece, _ in pieces:
        vocab.setdefault(piece, len(vocab))
    filler = 0
    while len(vocab) < TINY_BASE_VOCAB:
        vocab.setdefault(f"<unused{filler}>", len(vocab))
        filler += 1
    merges = [
        tuple(merge) if isinstance(merge, list) else tuple(merge.split(" "))
        for merge in learned["merges"]
    ]

    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, normalized=False, special=True) for token in ("<unk>", "<s>")]
    )
    tokenizer.add_tokens([AddedToken("</s>", normalized=False, rstrip=True, special=False)])
    tokenizer.add_special_tokens(
        [
            AddedToken(token, normalized=False, rstrip=rstrip, special=True)
            for token, rstrip in official_added_tokens()
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|system|>", "<|end|>", "<|user|>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        add_bos_token=True,
        add_eos_token=False,
    )


def tiny_config(vocab_size: int, pad_token_id: int):
    """The documented tiny `Phi3VConfig`."""
    from phi3v_train.model.configuration_phi3_v import Phi3VConfig

    return Phi3VConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.0 + 2.0 * i for i in range(8)],
        },
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        sliding_window=262144,
        tie_word_embeddings=False,
        initializer_range=0.02,
        embd_layer={
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        img_processor={
            "image_dim_out": 32,
            "model_name": "tiny-clip-vit-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "projection_dim": 32,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
            },
        },
        attn_implementation="eager",
    )


def write_tiny(out_dir: Path, seed: int = 0) -> None:
    """Write every file of the tiny preset into `out_dir` (which must exist)."""
    from transformers import GenerationConfig

    from phi3v_train.model.image_processing_phi3_v import Phi3VImageProcessor
    from phi3v_train.model.modeling_phi3_v import Phi3VForCausalLM
    from phi3v_train.model.processing_phi3_v import Phi3VProcessor

    tokenizer = build_tiny_tokenizer()
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = tiny_config(vocab_size, pad_id)
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=pad_id)
    model.save_pretrained(out_dir)
    Phi3VProcessor(Phi3VImageProcessor(num_crops=NUM_CROPS), tokenizer).save_pretrained(out_dir)


def make_tiny(out_dir: Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Build the tiny preset into `out_dir` atomically (a temp dir renamed into place)."""
    import phi3v_train  # noqa: F401  (registers the Auto classes used by save/load)

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_tiny(staging, seed)
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


@click.command("make-tiny")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Weight initialisation seed (0..2**32-1).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
def make_tiny_command(out_dir: Path, seed: int, overwrite: bool) -> None:
    """Write the built-in tiny Phi-3.5-vision preset (model + tokenizer + processor) to OUT_DIR."""
    try:
        path = make_tiny(out_dir, seed, overwrite=overwrite)
    except FileExistsError as error:
        raise click.ClickException(f"{error} (pass --overwrite to replace it)") from None
    except OSError as error:
        reason = describe_os_error(error)
        raise click.ClickException(f"{out_dir}: cannot write the tiny preset: {reason}") from None
    click.echo(f"wrote the tiny Phi-3.5-vision preset to {path}")


__all__ = ["make_tiny", "make_tiny_command", "build_tiny_tokenizer", "tiny_config"]
