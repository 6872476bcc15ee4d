"""GPT-2 BPE through tiktoken, built offline from the rank table bundled in `harness/assets`."""

import base64
import functools
import gzip
from importlib import resources

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

END_OF_TEXT = 50256
RANKS_FILE = "gpt2.tiktoken.gz"


def _mergeable_ranks() -> dict[bytes, int]:
    raw = gzip.decompress(resources.files("harness.assets").joinpath(RANKS_FILE).read_bytes())
    ranks = {}
    for line in raw.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """The same encoding as `tiktoken.get_encoding("gpt2")`, without its download."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=_mergeable_ranks(),
        special_tokens={"<|endoftext|>": END_OF_TEXT},
        explicit_n_vocab=50257,
    )
