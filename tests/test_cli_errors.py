"""Bad input at the command line: one ``qqq: error: ...`` line that names the flag or file, given before the
model loads (``no_model_load`` fails a test that loads it first)."""

import argparse
import json
import re

import pytest
from conftest import tiny_model

from qqq import cli
from qqq.checkpoint import CHECKPOINT_FILE
from qqq.cli import main
from qqq.models import EMBEDDED_MODEL, load_tokenizer

ERROR_LINE = re.compile(r"^qqq( [a-z]+)*: error: ")


def error_of(argv: list[str], capsys) -> str:
    """The one error line that ``qqq argv`` exits with (ours, or argparse's for a malformed flag)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    message = exited.value.code if isinstance(exited.value.code, str) else capsys.readouterr().err.strip()
    last = message.splitlines()[-1]
    assert ERROR_LINE.match(last), message
    return last


@pytest.fixture
def no_model_load(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "load_model", load_model)


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "w4a8"
    main(["quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--out", str(out),
          "--device", "cpu"])
    return out


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    """A .txt file of about 20 windows of 16 tokens."""
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 25)
    return path


def test_jsonl_lines_without_text_name_the_flag_and_line(tiny_model_dir, tmp_path, capsys, no_model_load):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "no text field"}) + "\n")
    message = error_of(["quantize", str(tiny_model_dir), "--method", "gptq", "--calib-dataset", str(data),
                        "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert "--calib-dataset" in message and 'line 2 has no "text"' in message
    message = error_of(["eval", "ppl", str(tiny_model_dir), "--eval-dataset", str(data), "--device", "cpu"], capsys)
    assert "--eval-dataset" in message and 'line 2 has no "text"' in message


@pytest.mark.parametrize("command", ["eval ppl", "generate"])
def test_truncated_checkpoint_is_a_clear_error(checkpoint, tmp_path, capsys, command):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in checkpoint.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = broken / CHECKPOINT_FILE
    tensors.write_bytes(tensors.read_bytes()[:5])
    message = error_of([*command.split(), str(broken), "--device", "cpu"], capsys)
    assert str(tensors) in message and "cannot be read" in message


@pytest.mark.parametrize("flag, value", [("--eval-windows", "0"), ("--eval-seqlen", "0"), ("--eval-windows", "x")])
def test_window_counts_must_be_positive(tiny_model_dir, capsys, no_model_load, flag, value):
    message = error_of(["eval", "ppl", str(tiny_model_dir), flag, value], capsys)
    assert f"argument {flag}:" in message


@pytest.mark.parametrize("value", ["-5", "0"])
def test_max_new_tokens_must_be_positive(tiny_model_dir, capsys, no_model_load, value):
    assert "argument --max-new-tokens: must be at least 1" in error_of(
        ["generate", str(tiny_model_dir), "--max-new-tokens", value], capsys)


def test_a_tokenizer_beyond_the_vocabulary_is_refused(tmp_path, capsys, no_model_load):
    folder = tmp_path / "mismatched"
    tiny_model("llama", hidden=64, intermediate=128, vocab=320).save_pretrained(folder)
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(folder)  # ids up to 49151
    message = error_of(["eval", "ppl", str(folder), "--device", "cpu"], capsys)
    assert "vocabulary has 320 entries" in message


def test_eval_seqlen_longer_than_the_text_names_the_flag(tiny_model_dir, short_text, capsys, no_model_load):
    message = error_of(["eval", "ppl", str(tiny_model_dir), "--eval-dataset", str(short_text),
                        "--eval-seqlen", "100000", "--device", "cpu"], capsys)
    assert "--eval-seqlen" in message and "fewer than one window" in message


def test_out_naming_a_file_is_refused_before_quantizing(tiny_model_dir, tmp_path, capsys, no_model_load):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    assert "is a file" in error_of(["quantize", str(tiny_model_dir), "--method", "rtn", "--out", str(target)], capsys)
    assert target.read_text() == "keep me"


def test_out_holding_files_is_refused_unless_forced(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["quantize", str(tiny_model_dir), "--method", "rtn", "--out", str(out), "--device", "cpu"]
    assert "already holds files" in error_of(argv, capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    main([*argv, "--force"])
    assert not (out / "notes.txt").exists() and (out / CHECKPOINT_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it


def test_quantizing_without_out_or_eval_is_refused(tiny_model_dir, capsys, no_model_load):
    assert "thrown away" in error_of(["quantize", str(tiny_model_dir), "--method", "rtn"], capsys)


def test_group_size_that_does_not_divide_the_layers_is_refused_first(tiny_model_dir, capsys, no_model_load):
    message = error_of(["quantize", str(tiny_model_dir), "--group-size", "128", "--eval"], capsys)
    assert "--group-size 128 does not divide" in message and "[-1, 32, 64]" in message


def test_round_to_nearest_says_it_used_no_calibration(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    main(["quantize", str(tiny_model_dir), "--method", "rtn", "--calib-dataset", str(empty),
          "--out", str(tmp_path / "out"), "--device", "cpu"])
    quantized = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("quantized with"))
    assert "no calibration" in quantized and "nsamples" not in quantized


@pytest.mark.parametrize("command", ["eval ppl", "generate", "quantize"])
def test_a_missing_local_folder_says_so(tmp_path, capsys, no_model_load, command):
    extra = ["--eval"] if command == "quantize" else []
    message = error_of([*command.split(), str(tmp_path / "nope"), *extra], capsys)
    assert f"no such folder: {tmp_path / 'nope'}" in message


def test_a_model_folder_without_tokenizer_files_says_so(tmp_path, capsys, no_model_load):
    tiny_model("llama", hidden=64, intermediate=128).save_pretrained(tmp_path)
    assert "holds no tokenizer files" in error_of(["eval", "ppl", str(tmp_path)], capsys)


def test_every_default_is_in_the_help():
    parsers, pending = [], [cli.build_parser()]
    while pending:
        parser = pending.pop()
        parsers.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += action.choices.values()
    assert len(parsers) == 9  # qqq, quantize, eval, ppl, zeroshot, demo, generate, export, tune
    for parser in parsers:
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert "default" in parser._get_formatter()._get_help_string(action), (parser.prog, action.dest)
    demo = cli.build_parser().parse_args(["demo"])
    assert (demo.group_size, demo.smooth_samples) == (64, 1)


def test_help_says_what_generate_device_is_for(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "device for generation" in " ".join(capsys.readouterr().out.split())


def test_eval_ppl_names_the_checkpoint_and_scores_a_cpu_sized_default(checkpoint, short_text, capsys,
                                                                       reference_backend):
    main(["eval", "ppl", str(checkpoint), "--eval-dataset", str(short_text), "--eval-seqlen", "16",
          "--device", "cpu"])
    out = capsys.readouterr()
    total = int(re.search(rf"on {cli.CPU_EVAL_WINDOWS} of the (\d+) 16-token windows", out.out)[1])
    assert total > cli.CPU_EVAL_WINDOWS and "--eval-windows all" in out.out
    assert "QQQ checkpoint: W4A8 made with w4a8_rtn, group size 32" in out.out
    assert f"; {cli.CPU_EVAL_WINDOWS} windows scored)" in out.out
    assert re.search(r"the first window took [\d.]+ s, so the other 7 should take about", out.out + out.err)
    main(["eval", "ppl", str(checkpoint), "--eval-dataset", str(short_text), "--eval-seqlen", "16",
          "--eval-windows", "all", "--device", "cpu"])
    assert f"; {total} windows scored)" in capsys.readouterr().out


def test_generate_labels_the_model_dtype(tiny_model_dir, capsys, reference_backend):
    main(["generate", str(tiny_model_dir), "--max-new-tokens", "2", "--device", "cpu"])
    assert "[unquantized, float32 model, 16-bit KV cache, PyTorch reference ops" in capsys.readouterr().out


def test_lm_eval_git_hash_is_quiet_outside_a_checkout(tmp_path, monkeypatch, capfd):
    zeroshot = pytest.importorskip("qqq.zeroshot")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert zeroshot._git_commit_quietly() is None
    assert "fatal" not in capfd.readouterr().err
