"""The embedded default model: a tiny Llama with a byte-level tokenizer, built offline.

``python -m fedllm_app.tiny_model --out DIR`` builds it from scratch: a random
Llama, then a short central pre-training on generic text of the task's surface
form (:func:`fedllm_app.data.synthetic.pretraining_corpus`, no task answers), because
LoRA on a purely random base does not learn. :func:`ensure_tiny_model` builds it
once into a cache directory keyed on the build spec and returns the path.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fedllm")
BUILDER_VERSION = 1
SPECIALS = ("<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Architecture and pre-training recipe of the embedded model.

    Attributes
    ----------
    hidden_size, num_layers, num_heads, intermediate_size : int
        Llama dimensions (tied input/output embeddings).
    pretrain_steps : int
        Central pre-training steps on the generic corpus.
    pretrain_batch_size : int
        Rows per pre-training step.
    pretrain_lr : float
        AdamW learning rate of the pre-training (cosine-decayed).
    max_length : int
        Longest sequence in tokens (bytes).
    seed : int
        Seeds weights, corpus and batch order.
    """

    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    pretrain_steps: int = 200
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    max_length: int = 256
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"v": BUILDER_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tokenizer():  # noqa: ANN201 - transformers' fast tokenizer class
    """Pure byte-level BPE (no merges): one token per byte, plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        model_max_length=TinySpec.max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pretraining_texts(spec: TinySpec, tokenizer) -> list[str]:  # noqa: ANN001
    from fedllm_app.config import TEMPLATE_NAMES
    from fedllm_app.data.synthetic import pretraining_corpus
    from fedllm_app.data.templates import prompt_text

    rng = random.Random(spec.seed)
    texts = []
    n = spec.pretrain_steps * spec.pretrain_batch_size
    for ex in pretraining_corpus(n, spec.seed):
        # Mostly the short chat form (the tiny default's template); alpaca and vicuna
        # often enough that they work too.
        template = rng.choices(TEMPLATE_NAMES, weights=(1, 1, 8))[0]
        texts.append(prompt_text(ex.instruction, template, tokenizer) + ex.response + tokenizer.eos_token)
    return texts


def build_tiny_model(out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Build, pre-train and save the tiny model and tokenizer into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    texts = _pretraining_texts(spec, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.pretrain_steps)
    model.train()
    bs = spec.pretrain_batch_size
    for step in range(spec.pretrain_steps):
        batch = tokenizer(
            texts[step * bs : (step + 1) * bs],
            padding=True,
            truncation=True,
            max_length=spec.max_length,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == spec.pretrain_steps - 1:
            log.info("tiny model: pre-training step %d/%d, loss %.3f", step + 1, spec.pretrain_steps, loss.item())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "fedllm_tiny_spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))
    return out_dir


def cache_root() -> Path:
    """``$FEDLLM_CACHE`` or ``~/.cache/fedllm``."""
    return Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm")).expanduser()


def ensure_tiny_model(spec: TinySpec = TinySpec()) -> Path:
    """Return the cached tiny model's directory, building it once (process-safe) if needed."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"tiny-llama-{spec.key()}"
    if (target / "config.json").exists():
        return target
    with open(root / f".tiny-llama-{spec.key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        start = time.time()
        log.info("building the embedded tiny model into %s (once, about a minute on 2 CPU cores)", target)
        tmp = Path(tempfile.mkdtemp(prefix="tiny-llama-", dir=root))
        try:
            build_tiny_model(tmp, spec)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("tiny model built in %.1f s", time.time() - start)
    return target


def main() -> None:
    """Entry point of ``fedllm-build-tiny``: build the tiny model and print its folder."""
    from fedllm_app.console import setup_console

    setup_console()
    parser = argparse.ArgumentParser(description="Build the embedded tiny model (offline).")
    parser.add_argument("--out", type=Path, default=None, help="directory to write; default: the cache")
    args = parser.parse_args()
    path = build_tiny_model(args.out) if args.out else ensure_tiny_model()
    print(path)


if __name__ == "__main__":
    main()
