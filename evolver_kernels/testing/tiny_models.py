"""Tiny Hugging Face models and data built from configs, for tests and examples (no hub, no download).

`make_population(kind, root, n)` writes n model directories that share a "pre-trained" ancestor and differ
by a seeded perturbation (what fine-tunes of one base model look like to the weights), each with a word-level
tokenizer, in safetensors. Kinds: bert, roberta (sequence classification), gpt2, llama (causal LM), t5
(seq2seq).
"""

from __future__ import annotations

import json
import os
import random

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
WORDS = [
    "good",
    "great",
    "fine",
    "happy",
    "love",
    "best",
    "nice",
    "calm",
    "bad",
    "awful",
    "poor",
    "sad",
    "hate",
    "worst",
    "pain",
    "angry",
    "the",
    "a",
    "movie",
    "food",
    "drug",
    "day",
    "it",
    "was",
    "very",
    "not",
    "so",
    "really",
    "and",
    "but",
    "with",
    "this",
    "that",
    "is",
    "of",
    "to",
    "in",
    "on",
    "for",
    "my",
]
VOCAB = SPECIALS + WORDS
POSITIVE = {"good", "great", "fine", "happy", "love", "best", "nice", "calm"}
NEGATIVE = {"bad", "awful", "poor", "sad", "hate", "worst", "pain", "angry"}
KINDS = ("bert", "roberta", "gpt2", "llama", "t5")


def make_tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind in ("bert", "roberta"):
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    elif kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="<s>",
        eos_token="</s>",
    )


def make_config(kind: str, num_labels: int = 3, multi_label: bool = False):
    import transformers as tf

    common = dict(vocab_size=len(VOCAB), pad_token_id=0, bos_token_id=5, eos_token_id=6)
    if kind in ("bert", "roberta"):
        cls = tf.BertConfig if kind == "bert" else tf.RobertaConfig
        cfg = cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=80,
            num_labels=num_labels,
            **common,
        )
        cfg.architectures = ["BertForSequenceClassification" if kind == "bert" else "RobertaForSequenceClassification"]
        if multi_label:
            cfg.problem_type = "multi_label_classification"
        cfg.id2label = {i: f"label{i}" for i in range(num_labels)}
        cfg.label2id = {f"label{i}": i for i in range(num_labels)}
        return cfg
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=80, **common)
        cfg.architectures = ["GPT2LMHeadModel"]
        return cfg
    if kind == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=80,
            tie_word_embeddings=False,
            **common,
        )
        cfg.architectures = ["LlamaForCausalLM"]
        return cfg
    if kind == "t5":
        cfg = tf.T5Config(
            d_model=32,
            d_kv=16,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            decoder_start_token_id=0,
            vocab_size=len(VOCAB),
            pad_token_id=0,
            eos_token_id=6,
        )
        cfg.architectures = ["T5ForConditionalGeneration"]
        return cfg
    raise ValueError(f"unknown tiny model kind {kind!r}; kinds: {', '.join(KINDS)}")


def _model_class(kind: str):
    import transformers as tf

    return {
        "bert": tf.BertForSequenceClassification,
        "roberta": tf.RobertaForSequenceClassification,
        "gpt2": tf.GPT2LMHeadModel,
        "llama": tf.LlamaForCausalLM,
        "t5": tf.T5ForConditionalGeneration,
    }[kind]


def make_population(
    kind: str,
    root: str,
    n: int,
    *,
    seed: int = 0,
    noise: float = 0.05,
    dtype=torch.float32,
    num_labels: int = 3,
    multi_label: bool = False,
    save_base: bool = False,
) -> list[str]:
    """n model directories under root: one seeded base model plus a different seeded perturbation each.
    With save_base, the unperturbed ancestor is written too, as root/<kind>-base."""
    config = make_config(kind, num_labels=num_labels, multi_label=multi_label)
    tokenizer = make_tokenizer(kind)
    torch.manual_seed(seed)
    base = _model_class(kind)(config).eval()
    if save_base:
        base.to(dtype).save_pretrained(os.path.join(root, f"{kind}-base"), safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(root, f"{kind}-base"))
        base = base.float()
    paths = []
    for k in range(n):
        model = _model_class(kind)(config).eval()
        model.load_state_dict(base.state_dict())
        gen = torch.Generator().manual_seed(seed * 1000 + k + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
        model = model.to(dtype)
        path = os.path.join(root, f"{kind}-{k}")
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def sentiment_rows(n: int, seed: int, domain_words: list[str] | None = None) -> list[dict]:
    """Short texts labelled 0 (negative), 1 (neutral) or 2 (positive) by their sentiment words."""
    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in POSITIVE | NEGATIVE]
    rows = []
    for _ in range(n):
        label = rng.randrange(3)
        words = [rng.choice(domain_words or filler) for _ in range(rng.randint(3, 8))]
        if label == 2:
            words.insert(rng.randrange(len(words) + 1), rng.choice(sorted(POSITIVE)))
        elif label == 0:
            words.insert(rng.randrange(len(words) + 1), rng.choice(sorted(NEGATIVE)))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def lm_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))} for _ in range(n)]


def seq2seq_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        rows.append({"input": " ".join(words), "target": " ".join(reversed(words))})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
