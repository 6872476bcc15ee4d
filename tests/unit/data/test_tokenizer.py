import gzip
import hashlib
from importlib import resources

from harness.data.tokenizer import END_OF_TEXT, RANKS_FILE, gpt2_encoding


def test_token_ids_from_the_seeds():
    enc = gpt2_encoding()
    assert enc.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert enc.encode(" despicable capitalists") == [47034, 32663]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [END_OF_TEXT] == [50256]
    assert enc.n_vocab == 50257


def test_round_trip_and_bundled_table_is_the_recorded_one():
    enc = gpt2_encoding()
    text = "It is a truth universally acknowledged… ünïcödé\n\n  spaces"
    assert enc.decode(enc.encode(text)) == text
    raw = gzip.decompress(resources.files("harness.assets").joinpath(RANKS_FILE).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
