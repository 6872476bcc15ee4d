"""GPT-2 BPE through tiktoken, built offline from the rank table bundled in `harness/assets`."""

import base64
import functools
import gzip
import json
from importlib import resources
from pathlib import Path

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


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, as vocab.json and merges.txt spell tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[byte] = chr(byte)
        else:
            stand_ins[byte] = chr(256 + extra)
            extra += 1
    return stand_ins


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts whose merge made `token`: BPE on its bytes with the merges ranked below it."""
    parts = [bytes([byte]) for byte in token]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
        best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        if pair_ranks[best] >= rank:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"GPT-2 token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


@functools.cache
def _hf_vocab_and_merges() -> tuple[str, str]:
    """The texts of vocab.json and merges.txt (computed once per process: a few seconds)."""
    ranks = _mergeable_ranks()
    spell = _byte_to_unicode()
    vocab = {"".join(spell[b] for b in token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = END_OF_TEXT
    merges = [
        " ".join("".join(spell[b] for b in part) for part in _merge_of(token, rank, ranks))
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"


def save_hf_tokenizer(directory: Path | str, model_max_length: int) -> None:
    """Write GPT-2's tokenizer in Hugging Face's files (vocab.json, merges.txt, tokenizer_config.json), built
    from the bundled ranks, so that `AutoTokenizer.from_pretrained(directory)` works offline."""
    directory = Path(directory)
    vocab, merges = _hf_vocab_and_merges()
    (directory / "vocab.json").write_text(vocab, encoding="utf-8")
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
