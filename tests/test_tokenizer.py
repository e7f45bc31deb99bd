"""qwenjax.tokenizer: local loading, chat templates, generation_config.json defaults (CPU, packaged tokenizer)."""

import json
from pathlib import Path

import pytest

from qwenjax.tokenizer import (
    GenerationDefaults,
    apply_chat_template,
    default_tokenizer_dir,
    has_tokenizer_files,
    load_chat_template,
    load_generation_defaults,
    load_tokenizer,
    resolve_tokenizer_dir,
)

GUIDE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Give me a short introduction to large language models."},
]
GUIDE_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nGive me a short introduction to large language models.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_tokenizer_dir())


def test_default_dir_is_packaged_and_loads(tok):
    assert Path(default_tokenizer_dir()).is_dir()
    assert has_tokenizer_files(default_tokenizer_dir())
    assert tok.eos_token_id == 151645
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]


def test_load_is_cached_per_path(tok):
    assert load_tokenizer(default_tokenizer_dir()) is tok
    # Same directory spelled differently resolves to the same cache entry.
    assert load_tokenizer(default_tokenizer_dir() + "/.") is tok


def test_load_rejects_non_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer("Qwen/Qwen2-7B-Instruct")  # a hub id: never downloaded
    with pytest.raises(FileNotFoundError, match="holds none of"):
        load_tokenizer(tmp_path)


def test_resolve_tokenizer_dir(tmp_path):
    assert resolve_tokenizer_dir(tmp_path, "/explicit") == "/explicit"
    assert resolve_tokenizer_dir(tmp_path) == default_tokenizer_dir()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert resolve_tokenizer_dir(tmp_path) == str(tmp_path)


def test_chat_template_guide_messages(tok):
    assert apply_chat_template(tok, GUIDE_MESSAGES) == GUIDE_PROMPT


def test_chat_template_inserts_default_system_prompt(tok):
    assert apply_chat_template(tok, GUIDE_MESSAGES[1:]) == GUIDE_PROMPT


def test_chat_template_without_generation_prompt(tok):
    prompt = apply_chat_template(tok, GUIDE_MESSAGES, add_generation_prompt=False)
    assert prompt == GUIDE_PROMPT.removesuffix("<|im_start|>assistant\n")


def test_chat_template_tokenize(tok):
    ids = apply_chat_template(tok, GUIDE_MESSAGES, tokenize=True)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids[0] == 151644 and ids.count(151645) == 2  # specials come from the template, none added
    assert tok.decode(ids) == GUIDE_PROMPT


def test_chat_template_text_parts_joined(tok):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert "<|im_start|>user\na\nb<|im_end|>" in apply_chat_template(tok, messages)


CUSTOM_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_custom_template_string(tok):
    prompt = apply_chat_template(tok, GUIDE_MESSAGES[1:], chat_template=CUSTOM_TEMPLATE)
    assert prompt == "[user]Give me a short introduction to large language models.\n[assistant]"


def test_custom_template_file(tok, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(CUSTOM_TEMPLATE)
    assert load_chat_template(path) == CUSTOM_TEMPLATE
    prompt = apply_chat_template(tok, GUIDE_MESSAGES[1:], chat_template=str(path), add_generation_prompt=False)
    assert prompt == "[user]Give me a short introduction to large language models.\n"


def test_template_neither_file_nor_jinja(tok):
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        apply_chat_template(tok, GUIDE_MESSAGES, chat_template="/no/such/template.jinja")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "messages is empty"),
        ("hello", "must be a list"),
        ([{"content": "hi"}], "lacks 'role'"),
        ([{"role": "user"}], "lacks 'content'"),
        ([{"role": "user", "content": None}], "must be a string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
        ([{"role": "", "content": "x"}], "non-empty string"),
        (["hi"], r"messages\[0\] must be a dict"),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        apply_chat_template(tok, messages)


class _NoTemplate:
    chat_template = None
    name_or_path = "no-template"


def test_missing_template_is_clear():
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_template(_NoTemplate(), GUIDE_MESSAGES)


def test_generation_defaults_packaged():
    d = load_generation_defaults(default_tokenizer_dir())
    assert d.eos_token_ids == (151645, 151643)
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert d.min_p is None and d.max_new_tokens is None
    assert d.sampling_overrides() == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def test_generation_defaults_missing_file(tmp_path):
    d = load_generation_defaults(tmp_path)
    assert d == GenerationDefaults() and d.sampling_overrides() == {} and d.eos_token_ids == ()
    with pytest.raises(FileNotFoundError):
        load_generation_defaults(tmp_path / "missing")


def test_generation_defaults_int_eos_and_max_new_tokens(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 7, "max_new_tokens": 64, "min_p": 0.1, "top_k": None, "do_sample": False})
    )
    d = load_generation_defaults(tmp_path)
    assert d.eos_token_ids == (7,)
    assert d.sampling_overrides() == {"min_p": 0.1, "max_tokens": 64}
    hash(d)  # frozen and hashable


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"temperature": "hot"}', "'temperature' must be a number"),
        ('{"top_k": 2.5}', "'top_k' must be an integer"),
        ('{"eos_token_id": [1, "x"]}', "'eos_token_id'"),
    ],
)
def test_generation_defaults_malformed(tmp_path, content, match):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_generation_defaults(tmp_path)
