"""The replay of llama.cpp's SentencePiece merging that finds text a vocabulary without byte
fall-back cannot encode (llama.cpp would abort the process on it)."""

from ps_local.spm_check import unencodable_character

PIECES = {"▁y": -1.0, "▁ye": -1.0, "▁yes": -1.0, "▁": -2.0, "x": -3.0}


def test_characters_merged_into_pieces_encode():
    assert unencodable_character("yes", PIECES) is None
    assert unencodable_character("yes x", PIECES) is None  # "▁" and "x" are pieces themselves


def test_a_character_in_no_piece_is_found():
    assert unencodable_character("yes é", PIECES) == "é"


def test_a_character_that_cannot_merge_here_is_found():
    # "y" only exists inside "▁y": after "x" it stays alone and needs a byte token.
    assert unencodable_character("xy", PIECES, add_space_prefix=False) == "y"
    assert unencodable_character("x y", PIECES, add_space_prefix=False) is None


def test_byte_tokens_rescue_any_character():
    pieces = {**PIECES, **{f"<0x{b:02X}>": 0.0 for b in range(256)}}
    assert unencodable_character("xy é ✓", pieces) is None


def test_special_tokens_are_split_off_first():
    # llama.cpp encodes "<s>" as one token and tokenizes the text around it on its own,
    # with a space before each fragment that follows a special token.
    assert unencodable_character("<s>yes", PIECES, specials=["<s>"]) is None
    assert unencodable_character("yes<s>yes", PIECES, specials=["<s>"]) is None
    assert unencodable_character("yes<s>é", PIECES, specials=["<s>"]) == "é"
    assert unencodable_character("<s>yes", PIECES) == "<"  # without the split: refused
