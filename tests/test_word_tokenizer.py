"""The small CLIP tokenizer builder used by tests and the toy world."""

from helpers import TINY_WORDS

from modeling_code.toy.word_tokenizer import build_clip_tokenizer


def test_every_listed_word_is_one_token_and_specials_come_last(tmp_path):
    tokenizer = build_clip_tokenizer(TINY_WORDS, tmp_path)
    for word in TINY_WORDS:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(ids) == [f"{word}</w>"], word
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (len(tokenizer) - 2, len(tokenizer) - 1)


def test_any_text_tokenises_and_decodes(tmp_path):
    tokenizer = build_clip_tokenizer(["cat", "sofa"], tmp_path)
    ids = tokenizer("A Zebra, on the SOFA!")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a zebra , on the sofa !"
