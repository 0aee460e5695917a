"""llmforge's chat renderer gives the same text, ids and assistant masks as transformers' apply_chat_template."""

from __future__ import annotations

import pytest

from llmforge.errors import TokenizerError, UserInputError
from llmforge.tokenizer.chat import check_template, default_chat_template, encode_chat, render
from llmforge.tokenizer.info import load_tokenizer, load_tokenizer_info

from .conftest import train_and_export

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write code:\n  def f(): pass"},
        {"role": "assistant", "content": "def f(x):\n    return x  # done 😀"},
        {"role": "user", "content": "中文呢？"},
        {"role": "assistant", "content": "好的，这是中文。 ꙮ"},
    ],
    # Content that contains chat markup and leading/trailing whitespace must still line up.
    [
        {"role": "user", "content": "  what is <|im_end|> for?  "},
        {"role": "assistant", "content": " It ends a turn: <|im_start|>user\n"},
    ],
    [{"role": "assistant", "content": ""}, {"role": "user", "content": "\n\n"}],
]


def test_default_template_text():
    msgs = CONVERSATIONS[1]
    assert (
        render(msgs)
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    )
    assert render(msgs[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen_prompt", [False, True])
def test_matches_transformers(tok_dir, hf_tokenizer, conv, gen_prompt):
    msgs = CONVERSATIONS[conv]
    want_text = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    tok = load_tokenizer(tok_dir)
    assert tok.render(msgs, add_generation_prompt=gen_prompt) == want_text
    want = hf_tokenizer.apply_chat_template(
        msgs, add_generation_prompt=gen_prompt, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encode_chat(tok, msgs, add_generation_prompt=gen_prompt)
    assert ids == list(want["input_ids"])
    assert mask == list(want["assistant_masks"])
    # Same through the directory path and the bare fast tokenizer.
    assert encode_chat(tok_dir, msgs, add_generation_prompt=gen_prompt) == (ids, mask)
    assert encode_chat(tok.fast, msgs, add_generation_prompt=gen_prompt) == (ids, mask)


def test_assistant_mask_covers_reply_and_end_of_turn(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids, mask = tok.encode_chat(CONVERSATIONS[1])
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(trained) == "Hello! How can I help?<|im_end|>"
    assert trained[-1] == tok.info.chat_token_ids["<|im_end|>"]
    assert tok.info.chat_token_ids["<|im_end|>"] in tok.info.stop_ids


def test_custom_chat_tokens(tmp_path, docs):
    chat = ["<|start|>", "<|end|>"]
    out = train_and_export(tmp_path / "custom", docs[:400], vocab_size=700, chat_tokens=chat)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    msgs = CONVERSATIONS[2]
    want = hf.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encode_chat(out, msgs)
    assert (ids, mask) == (list(want["input_ids"]), list(want["assistant_masks"]))
    assert render(msgs, template=default_chat_template(*chat)).startswith("<|start|>system\n")
    info = load_tokenizer_info(out)
    assert set(info.chat_token_ids) == set(chat)
    assert info.stop_ids == (info.eos_id, info.chat_token_ids["<|end|>"])


def test_bad_templates_name_the_knob():
    with pytest.raises(UserInputError, match=r"tokenizer\.chat_template.*not valid Jinja"):
        check_template("{% for m in messages %}{{ m.content }")
    with pytest.raises(TokenizerError, match=r"tokenizer\.chat_template: rendering failed"):
        check_template("{{ raise_exception('no system role allowed') }}")
    with pytest.raises(UserInputError, match=r"tokenizer\.chat_template.*drops message content"):
        check_template("{% for m in messages %}{{ m.role }}{% endfor %}")
    facts = check_template(default_chat_template())
    assert facts == {"generation_markers": True, "generation_prompt": True}


def test_empty_conversation_is_an_error():
    with pytest.raises(UserInputError, match="empty conversation"):
        render([])
