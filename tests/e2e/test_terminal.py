"""What a user sees in a terminal: the real command on a pseudo-terminal, its output replayed on a small
terminal model (carriage returns, cursor-up, overwrites), so that a bar left above a log line, or a line printed
into a bar, shows up exactly as it would on screen."""

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
import textwrap
import time

from tests.conftest import TINY, new_store

BAR = re.compile(r"\d+%\|")
COLUMNS = 120


def run_on_terminal(args: list[str], cwd, env: dict, timeout: float = 300) -> tuple[str, int]:
    """Run `args` with stdin, stdout and stderr on one pseudo-terminal of COLUMNS × 40; returns what it wrote."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once, nothing else
        os.chdir(cwd)
        os.execvpe(args[0], args, env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, COLUMNS, 0, 0))
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
        else:
            os.kill(pid, 9)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return output.decode(errors="replace"), os.waitstatus_to_exitcode(status)


def screen(stream: str) -> list[str]:
    """The lines a terminal holds after `stream`, scrollback included: `\\r` returns to column 0, `\\n` moves
    down, ESC[nA moves up, ESC[K clears to the end of the line, other characters overwrite."""
    lines, row, col, i = [""], 0, 0, 0
    while i < len(stream):
        escape = re.match(r"\x1b\[(\d*)([A-Za-z])", stream[i:])
        if escape:
            if escape.group(2) == "A":
                row = max(0, row - int(escape.group(1) or 1))
            elif escape.group(2) == "K":
                lines[row] = lines[row][:col]
            i += escape.end()
            continue
        char = stream[i]
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + char + line[col + 1 :]
            col += 1
        i += 1
    return [line.rstrip() for line in lines if line.strip()]


def terminal_env(tmp_path) -> dict:
    # Every update drawn (tqdm's own variables): the test sees each count the bar reaches, not a sample.
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": new_store(tmp_path / "mlflow.db"),
        "TQDM_MININTERVAL": "0",
        "TQDM_MINITERS": "1",
        "HYDRA_FULL_ERROR": "0",
        "TERM": "xterm",
    }


def test_a_trial_on_a_terminal_counts_every_step_and_prints_each_line_once_and_whole(tmp_path):
    steps = 7
    overrides = [
        o
        for o in TINY
        if not o.startswith(
            ("trainer.max_steps", "trainer.progress", "tracking.log_interval", "trainer.checkpoint_interval")
        )
    ]
    stream, status = run_on_terminal(
        [
            sys.executable,
            "-m",
            "harness",
            *overrides,
            f"trainer.max_steps={steps}",
            "trainer.checkpoint_interval=3",
            "tracking.log_interval=5",
        ],
        tmp_path,
        terminal_env(tmp_path),
    )
    assert status == 0, stream[-3000:]
    # The bar counts every step, though values come back from the device only at each read-back (here at the
    # ends of the checkpoint periods, after steps 1, 4 and 7): the count does not wait for them.
    assert {int(k) for k in re.findall(rf" (\d+)/{steps} \[", stream)} == set(range(steps + 1))
    assert "loss=" in stream and "tok_s=" in stream
    # The test evaluation and the checkpoints show their own short bars while they run ...
    assert re.search(r"test loss \(fp32\):.*\| \d/2 \[", stream)
    assert re.search(r"checkpoint step_000004:.*\| \d/4 \[.*state\.pt", stream)
    lines = screen(stream)
    # ... and leave nothing behind: the only bar on screen is the finished training bar, once.
    bars = [line for line in lines if BAR.search(line)]
    assert len(bars) == 1 and bars[0].startswith("100%|") and f"| {steps}/{steps} [" in bars[0], "\n".join(lines)
    # Every log line starts at the left margin, whole, once: none was printed into a bar or over one.
    logged = [line for line in lines if "[harness." in line]
    assert all(line.startswith("[20") for line in logged), "\n".join(lines)
    for step in (1, 4, 7):
        assert sum(f"saved checkpoint step_{step:06d} " in line for line in lines) == 1
        assert sum(f"] - step {step}: period loss" in line for line in lines) == 1
    assert lines[-2].startswith("[20") and "test loss" in lines[-2] and lines[-1].startswith("test_loss ")


def test_a_study_line_a_log_record_and_a_warning_print_through_a_drawn_bar(tmp_path):
    """The study's progress thread prints `trial k of N` while a trial's bar is drawn in the same process
    (Hydra's basic launcher runs trials in the study's process): it goes through the bar, not into it."""
    script = textwrap.dedent("""
        import logging, sys, threading, time, warnings
        from harness import progress
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[log] %(message)s")
        with progress.through_bars(), progress.training_bar(20) as bar:
            for step in range(20):
                bar.update(1)
                bar.set_postfix(loss=f"{10 - step / 10:.4f}")
                if step == 5:
                    thread = threading.Thread(target=progress.write_line, args=(progress.study_line(
                        "quick", 6, 1, 1, 0, {"FINISHED": 1}, 75.0),))
                    thread.start()
                    thread.join()
                if step == 10:
                    logging.getLogger("harness.trial.trainer").info("saved checkpoint step_000011 (38.8 MB) in 0.1 s")
                if step == 15:
                    warnings.warn("a warning in the step loop")
                time.sleep(0.01)
        print("after")
    """)
    stream, status = run_on_terminal([sys.executable, "-c", script], tmp_path, terminal_env(tmp_path))
    assert status == 0, stream
    assert screen(stream)[:3] == [
        "[study quick] trial 2 of 6: 1 done (1 FINISHED), 1 running | elapsed 1m15s, ETA 6m15s",
        "[log] saved checkpoint step_000011 (38.8 MB) in 0.1 s",
        "<string>:17: UserWarning: a warning in the step loop",
    ], stream
    assert re.fullmatch(r"100%\|█+\| 20/20 \[.*loss=8\.1000\]", screen(stream)[3]) and screen(stream)[4:] == ["after"]


def test_progress_off_draws_no_bar_on_a_terminal(tmp_path):
    stream, status = run_on_terminal(
        [
            sys.executable,
            "-c",
            "from harness import progress\n"
            "with progress.training_bar(5, enabled=False) as bar:\n"
            "    [bar.update(1) for _ in range(5)]\n"
            "list(progress.short_bar(range(3), 3, 'test loss (fp32)', enabled=False))\n"
            "print('done')",
        ],
        tmp_path,
        terminal_env(tmp_path),
    )
    assert status == 0 and screen(stream) == ["done"], stream
