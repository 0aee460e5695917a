"""llmforge's chat renderer gives the same text, ids and assistant masks as transformers' apply_chat_template."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from llmforge.errors import TokenizerError, UserInputError
from llmforge.tokenizer.chat import check_template, default_chat_template, encode_chat, render
from llmforge.tokenizer.info import load_tokenizer, load_tokenizer_info
from tests.core.import_graph import import_graph

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
    # Same through the method and the bare fast tokenizer (with the default template, which tok_dir carries).
    assert tok.encode_chat(msgs, add_generation_prompt=gen_prompt) == (ids, mask)
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
    ids, mask = encode_chat(load_tokenizer(out), msgs)
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


def test_any_object_with_fast_and_info_is_a_chat_tokenizer(tok_dir):
    # chat types tokenizers by shape (it must not import info.LoadedTokenizer), so a stand-in works the same.
    tok = load_tokenizer(tok_dir)
    stand_in = SimpleNamespace(fast=tok.fast, info=tok.info)
    assert encode_chat(stand_in, CONVERSATIONS[2]) == tok.encode_chat(CONVERSATIONS[2])


def test_a_path_is_refused_with_the_loader_to_use(tok_dir):
    with pytest.raises(TypeError, match=r"load_tokenizer\(path\)\.encode_chat"):
        encode_chat(tok_dir, CONVERSATIONS[1])


def test_template_variables_reach_the_mask_check(tok_dir):
    # A template that needs a special token must see it in every render check_template does, the mask check too.
    tok = load_tokenizer(tok_dir)
    variables = tok.info.template_variables()
    template = (
        "{% if not bos_token %}{{ raise_exception('no bos_token') }}{% endif %}" + default_chat_template()
    )
    assert check_template(template, fast=tok.fast, variables=variables)["generation_markers"]
    ids, mask = encode_chat(tok.fast, CONVERSATIONS[1], template=template, variables=variables)
    assert (ids, mask) == tok.encode_chat(CONVERSATIONS[1])
    with pytest.raises(TokenizerError, match="no bos_token"):
        encode_chat(tok.fast, CONVERSATIONS[1], template=template)


# -- chat sits below info: info.LoadedTokenizer calls chat, chat never imports info ----------------------------


def test_chat_source_never_imports_info():
    # Any import statement counts, inside functions too (tests/core/test_imports.py holds the whole package
    # free of cycles; this names the direction: chat is the lower module).
    imported = import_graph()["llmforge.tokenizer.chat"]
    assert "llmforge.errors" in imported  # relative imports are resolved (`..errors`)
    assert "llmforge.tokenizer.info" not in imported, imported
    assert "llmforge.tokenizer.chat" in import_graph()["llmforge.tokenizer.info"]


def test_chat_runs_without_loading_info(tok_dir):
    # In a fresh interpreter: import chat, render and encode with a bare fast tokenizer, and info stays unloaded.
    code = (
        "import sys\n"
        "from tokenizers import Tokenizer\n"
        "from llmforge.tokenizer import chat\n"
        f"fast = Tokenizer.from_file({str(tok_dir / 'tokenizer.json')!r})\n"
        "msgs = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]\n"
        "chat.render(msgs)\n"
        "ids, mask = chat.encode_chat(fast, msgs)\n"
        "assert any(mask)\n"
        "chat.check_template(chat.DEFAULT_CHAT_TEMPLATE, fast=fast)\n"
        "print('INFO LOADED', 'llmforge.tokenizer.info' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "INFO LOADED False" in res.stdout
