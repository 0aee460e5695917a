"""Make the inputs of this example: a local Hugging Face Llama checkpoint and the data to fine-tune it on.

In real use the checkpoint is one you already have (a `save_pretrained` folder, or a hub download such as
`huggingface-cli download <org>/<model> --local-dir checkpoint`). There is no hub here, so this script builds
a tiny one with `transformers` the way any Llama-family model is published:

* ``checkpoint/`` — ``LlamaForCausalLM`` (random weights, 2 layers, width 64) saved with ``save_pretrained``,
  and a byte-level BPE ``PreTrainedTokenizerFast`` with ChatML tokens and a chat template (with
  ``{% generation %}`` markers, so SFT can mask the loss to the assistant's turns);
* ``data/corpus/`` — plain-text documents: the data stage cleans them, the tokenizer stage cuts them into token
  shards, and the quantize stage calibrates GPTQ on the train split and measures perplexity on the val split;
* ``data/sft.jsonl`` — arithmetic conversations whose answers follow one format (``The answer is N.``);
* ``data/prefs.jsonl`` — preference pairs for DPO: the answer in that format (chosen) vs a vague reply.

Everything is generated from a seed, so two runs write identical files.

    python prepare.py [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# ChatML, as Qwen2 and many Llama fine-tunes use it. The generation markers tell transformers (and llmforge)
# which characters the assistant produced: `return_assistant_tokens_mask` and SFT's loss mask come from them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

_SUBJECTS = (
    "the river|a small boat|the old mill|our village|the north road|a quiet garden|the harbour|the forest|"
)
_SUBJECTS += "the baker|my neighbour|the schoolteacher|a tired farmer|the museum|the library|the market"
_VERBS = "runs past|looks over|stands beside|waits near|leads to|turns toward|opens onto|rests under|faces"
_OBJECTS = "the bridge|the hills|a field of wheat|the station|the church tower|an empty square|the lake|"
_OBJECTS += "the valley|a row of houses|the coast|the orchard|the town hall|the railway line"
_TAILS = "every morning|in the spring|after the rain|before sunset|during the long winter|on market days|"
_TAILS += "when the wind is calm|for most of the year|at the end of the summer|as the children walk to school"
_LINKS = [
    "",
    "Even so, ",
    "In the evening, ",
    "Most days, ",
    "Later, ",
    "Nobody is sure why, but ",
    "Again, ",
]


def _sentence(rng: random.Random) -> str:
    pick = lambda s: rng.choice(s.split("|"))  # noqa: E731
    text = f"{rng.choice(_LINKS)}{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_TAILS)}."
    return text[0].upper() + text[1:]


def corpus_docs(n: int, rng: random.Random) -> list[str]:
    """English prose of 3 paragraphs x 4-6 sentences: enough words and stop words for the quality filters,
    different enough from one another to survive near-duplicate removal."""
    return [
        "\n\n".join(" ".join(_sentence(rng) for _ in range(rng.randint(4, 6))) for _ in range(3))
        for _ in range(n)
    ]


def question(a: int, b: int, rng: random.Random) -> str:
    return rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]).format(a=a, b=b)


def sft_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        msgs = [{"role": "user", "content": question(a, b, rng)}]
        msgs.append({"role": "assistant", "content": f"The answer is {a + b}."})
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "You are a careful calculator."})
        rows.append({"messages": msgs})
    return rows


def preference_rows(n: int, rng: random.Random) -> list[dict]:
    vague = ["I do not know.", "No idea, sorry.", "Maybe {w}?", "{w} or so", "Hard to say."]
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        wrong = a + b + rng.randint(1, 5)
        rows.append(
            {
                "prompt": question(a, b, rng),
                "chosen": f"The answer is {a + b}.",
                "rejected": rng.choice(vague).format(w=wrong),
            }
        )
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (lossless on any text) trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def make_checkpoint(out: Path, texts: list[str], seed: int) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(texts, vocab_size=512)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, im_end],
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, im_end], pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="example folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    data = args.out / "data"
    (data / "corpus").mkdir(parents=True, exist_ok=True)
    docs = corpus_docs(240, rng)
    for i, doc in enumerate(docs):
        (data / "corpus" / f"doc{i:03d}.txt").write_text(doc + "\n", encoding="utf-8")
    sft, prefs = sft_rows(800, rng), preference_rows(400, rng)
    _write_jsonl(data / "sft.jsonl", sft)
    _write_jsonl(data / "prefs.jsonl", prefs)

    chat_text = [m["content"] for r in sft for m in r["messages"]] + [p["rejected"] for p in prefs]
    ckpt = make_checkpoint(args.out / "checkpoint", docs + chat_text, args.seed)
    print(f"wrote {ckpt} and {data}")
    return ckpt


if __name__ == "__main__":
    main()
