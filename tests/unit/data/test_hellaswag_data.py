"""HellaSwag's data: lm-eval's text preprocessing, and the download (from a real HTTP server on 127.0.0.1 or a
file:// URL) checked, recorded in a manifest, and refused whole when truncated, corrupt or of the wrong size."""

import hashlib
import http.server
import json
import threading

import pytest

from harness.data.hellaswag import (
    DATA_FILE,
    MANIFEST,
    HellaswagDataError,
    example_from_record,
    load_hellaswag,
    prepare_hellaswag,
    preprocess,
)
from harness.data.prepare import PrepareError, prepare
from tests.conftest import run_in_process
from tests.fixtures.hellaswag import fixture_records, write_fixture

COUNT = 24


class Server:
    """Serves `body` at every path; `declared_length` (when set) is the Content-Length sent instead of the
    body's own, so a shorter body is a connection closed mid-download."""

    def __init__(self, body: bytes, declared_length: int | None = None):
        self.body, self.declared_length, self.requests = body, declared_length, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(server.declared_length or len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/{DATA_FILE}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fixture_bytes(tmp_path) -> bytes:
    write_fixture(tmp_path / "source.jsonl", COUNT)
    return (tmp_path / "source.jsonl").read_bytes()


def assert_nothing_kept(out) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # not even the directory made for it


def test_preprocess_is_lm_evals_text():
    record = {
        "ind": 7,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to clean a pan [title] Rinse it with hot water.",
        "ctx_b": "then DRY it",
        "endings": ["[step] Oil it  lightly. ", " Put it away.", "Sell it [substeps] quickly.", "Eat it."],
        "label": "2",
    }
    example = example_from_record(record)
    # " [title]" becomes ". ", bracketed markers go, double spaces collapse; ctx_b is str.capitalize()d.
    assert example.context == "Home and Garden: How to clean a pan. Rinse it with hot water. Then dry it"
    assert example.endings == (" Oil it lightly.", "Put it away.", "Sell it quickly.", "Eat it.")
    assert example.label == 2 and example.ind == 7
    assert preprocess("  a [title]b  [x]c ") == "a. b c"


def test_the_original_files_example_24_becomes_lm_evals_query():
    record = {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "label": 3,
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off."] * 2,
    }
    assert example_from_record(record).context == "Roof shingle removal: A man is sitting on a roof. He"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"endings": ["a", "b", "c"]}, "expected 4 strings"),
        ({"label": 4}, "expected 0 to 3"),
        ({"label": True}, "expected 0 to 3"),
        ({"ctx_a": None}, "'ctx_a'"),
    ],
)
def test_a_malformed_record_is_refused_naming_the_field(change, message):
    record = {**fixture_records(1)[0], **change}
    with pytest.raises(HellaswagDataError, match=message):
        example_from_record(record)


def test_prepare_downloads_checks_and_records_a_manifest(tmp_path, fixture_bytes):
    out = tmp_path / "hellaswag"
    with Server(fixture_bytes) as server:
        assert prepare_hellaswag(out, server.url, expected_examples=COUNT) == out
        assert (out / DATA_FILE).read_bytes() == fixture_bytes
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["sha256"] == hashlib.sha256(fixture_bytes).hexdigest()
        assert (manifest["examples"], manifest["bytes"], manifest["url"]) == (COUNT, len(fixture_bytes), server.url)
        assert load_hellaswag(out) == load_hellaswag(tmp_path / "source.jsonl")
        assert len(load_hellaswag(out)) == COUNT
        prepare_hellaswag(out, server.url, expected_examples=COUNT)  # already prepared: not downloaded again
        assert server.requests == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, DATA_FILE])


def test_prepare_reads_a_file_url(tmp_path, fixture_bytes):
    out = prepare_hellaswag(tmp_path / "out", (tmp_path / "source.jsonl").as_uri(), expected_examples=COUNT)
    assert len(load_hellaswag(out)) == COUNT


def test_a_truncated_download_is_refused_and_nothing_is_kept(tmp_path, fixture_bytes):
    out = tmp_path / "hellaswag"
    cut = fixture_bytes[: len(fixture_bytes) // 2]
    with Server(cut, declared_length=len(fixture_bytes)) as server, pytest.raises(PrepareError) as refused:
        prepare_hellaswag(out, server.url, expected_examples=COUNT)
    assert "truncated" in str(refused.value) and "\n" not in str(refused.value)
    assert_nothing_kept(out)


def test_a_download_cut_at_a_line_end_without_content_length_is_refused_by_its_count(tmp_path, fixture_bytes):
    lines = fixture_bytes.split(b"\n")
    out = tmp_path / "hellaswag"
    with Server(b"\n".join(lines[: COUNT // 2]) + b"\n") as server, pytest.raises(PrepareError, match=f"{COUNT}"):
        prepare_hellaswag(out, server.url, expected_examples=COUNT)
    assert_nothing_kept(out)


def test_a_corrupt_download_is_refused_naming_the_line(tmp_path, fixture_bytes):
    lines = fixture_bytes.split(b"\n")
    lines[5] = lines[5][:-3] + b"#!\x00"
    out = tmp_path / "hellaswag"
    with Server(b"\n".join(lines)) as server, pytest.raises(PrepareError, match="line 6 is not a JSON object"):
        prepare_hellaswag(out, server.url, expected_examples=COUNT)
    assert_nothing_kept(out)


def test_a_changed_file_is_refused_on_load_and_on_prepare(tmp_path, fixture_bytes):
    out = prepare_hellaswag(tmp_path / "out", (tmp_path / "source.jsonl").as_uri(), expected_examples=COUNT)
    data = bytearray((out / DATA_FILE).read_bytes())
    data[100] ^= 1
    (out / DATA_FILE).write_bytes(bytes(data))
    with pytest.raises(HellaswagDataError, match="sha256"):
        load_hellaswag(out)
    with pytest.raises(PrepareError, match="delete .* and prepare it again"):
        prepare_hellaswag(out, (tmp_path / "source.jsonl").as_uri(), expected_examples=COUNT)
    assert bytes(data) == (out / DATA_FILE).read_bytes()  # the user's file is left for them to inspect


def test_a_lost_file_is_downloaded_again_only_with_the_recorded_checksum(tmp_path, fixture_bytes):
    out = prepare_hellaswag(tmp_path / "out", (tmp_path / "source.jsonl").as_uri(), expected_examples=COUNT)
    (out / DATA_FILE).unlink()
    other = tmp_path / "other.jsonl"
    write_fixture(other, COUNT, seed=1)
    with pytest.raises(PrepareError, match="recorded .* at the first download"):
        prepare_hellaswag(out, other.as_uri(), expected_examples=COUNT)
    assert not (out / DATA_FILE).exists()
    prepare_hellaswag(out, (tmp_path / "source.jsonl").as_uri(), expected_examples=COUNT)
    assert (out / DATA_FILE).read_bytes() == fixture_bytes


def test_a_file_in_the_way_is_not_overwritten(tmp_path, fixture_bytes):
    out = tmp_path / "out"
    out.mkdir()
    (out / DATA_FILE).write_text("mine\n")
    with pytest.raises(PrepareError, match="exists without a manifest; move it away"):
        prepare_hellaswag(out, (tmp_path / "source.jsonl").as_uri(), expected_examples=COUNT)
    assert (out / DATA_FILE).read_text() == "mine\n"


def test_prepare_dispatches_hellaswag_and_refuses_options_of_other_datasets(tmp_path, fixture_bytes):
    with pytest.raises(PrepareError, match="workers does not apply to dataset=hellaswag"):
        prepare("hellaswag", out=tmp_path / "out", workers=2)
    with pytest.raises(PrepareError, match="shard_tokens does not apply to dataset=hellaswag"):
        prepare("hellaswag", out=tmp_path / "out", shard_tokens=1000)
    with pytest.raises(PrepareError, match=f"it holds {COUNT} examples, HellaSwag's validation split has 10,042"):
        prepare("hellaswag", out=tmp_path / "out", url=(tmp_path / "source.jsonl").as_uri())
    with pytest.raises(PrepareError, match="url does not apply to dataset=fineweb"):
        prepare("fineweb", out=tmp_path / "out", url="http://127.0.0.1:1/x")


def test_the_command_refuses_a_file_without_the_validation_splits_10042_examples(tmp_path, fixture_bytes):
    out = tmp_path / "hellaswag"
    with Server(fixture_bytes) as server:
        done = run_in_process("prepare", "dataset=hellaswag", f"out={out}", f"url={server.url}", check=False)
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: refused the download") and f"{COUNT:,} examples" in error and "10,042" in error
    assert_nothing_kept(out)
