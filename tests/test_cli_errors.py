"""Bad input at the command line: one ``qqq: error: ...`` line that names the flag or file, given before the
model loads (``no_model_load`` fails a test that loads it first)."""

import argparse
import json
import re

import pytest
import torch
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


def test_out_never_replaces_the_model_it_is_made_from(tiny_model_dir, tmp_path, capsys, no_model_load,
                                                      monkeypatch):
    """Not with --force either: the model folder itself, a folder holding it, and the current folder."""
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    for out in (tiny_model_dir, tiny_model_dir.parent):
        argv = ["quantize", str(tiny_model_dir), "--method", "rtn", "--out", str(out), "--force", "--device", "cpu"]
        assert "what it is made from" in error_of(argv, capsys)
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", str(tiny_model_dir), "--method", "rtn", "--out", ".", "--device", "cpu"]
    assert "holds the current folder" in error_of(argv, capsys)
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before


def test_out_where_nothing_can_be_written_is_refused_before_quantizing(tiny_model_dir, tmp_path, capsys,
                                                                       no_model_load):
    (tmp_path / "file.txt").write_text("x")
    argv = ["quantize", str(tiny_model_dir), "--method", "rtn", "--out", str(tmp_path / "file.txt" / "sub")]
    assert "is a file, not a folder" in error_of(argv, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the write probe left nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["quantize", "MODEL", "--method", "rtn", "--eval"], ["generate", "MODEL"],
                                     ["eval", "ppl", "MODEL"]])
def test_a_cuda_device_without_cuda_is_refused_first(tiny_model_dir, capsys, no_model_load, command):
    argv = [str(tiny_model_dir) if word == "MODEL" else word for word in command]
    assert "no CUDA GPU" in error_of([*argv, "--device", "cuda"], capsys)


@pytest.mark.parametrize("command", ["quantize", "generate"])
def test_an_unsupported_architecture_is_refused_before_loading(tmp_path, capsys, no_model_load, command):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    folder.mkdir()
    GPT2Config(n_layer=1, n_embd=64, n_head=2).save_pretrained(folder)
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(folder)
    argv = [command, str(folder), "--device", "cpu"] + (["--method", "rtn", "--eval"] if command == "quantize" else [])
    assert "model_type 'gpt2' is not supported" in error_of(argv, capsys)


def test_packed_w4a8_needs_input_sizes_in_chunks_of_64(tmp_path, capsys, no_model_load):
    folder = tmp_path / "odd"
    tiny_model("llama", hidden=96, intermediate=128, vocab=len(load_tokenizer(EMBEDDED_MODEL))).save_pretrained(folder)
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(folder)
    message = error_of(["quantize", str(folder), "--method", "rtn", "--group-size", "32", "--eval"], capsys)
    assert "multiples of 64" in message


@pytest.mark.parametrize("flag,value", [("--alpha", "nan"), ("--alpha", "-3"), ("--alpha", "1.5")])
def test_fractions_outside_zero_to_one_are_refused(tiny_model_dir, capsys, flag, value):
    message = error_of(["quantize", str(tiny_model_dir), "--method", "w8a8_smoothquant", "--eval", flag, value], capsys)
    assert "must be in [0, 1]" in message
    assert "must be in [0, 1]" in error_of(["generate", str(tiny_model_dir), "--kv-smooth", value], capsys)


def test_more_smoothing_windows_than_calibration_windows_is_refused(tiny_model_dir, capsys, no_model_load):
    argv = ["quantize", str(tiny_model_dir), "--method", "qqq", "--eval", "--nsamples", "2", "--smooth-samples", "10"]
    assert "--smooth-samples 10 exceeds the 2 calibration windows" in error_of(argv, capsys)


def test_generating_past_the_models_positions_is_refused(tiny_model_dir, capsys, no_model_load):
    positions = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    argv = ["generate", str(tiny_model_dir), "--max-new-tokens", str(positions), "--device", "cpu"]
    assert f"exceed the {positions} positions" in error_of(argv, capsys)


@pytest.mark.parametrize("command, found", [
    (["eval", "zeroshot", "MODEL", "--limit", "1"], "the tokenizer has 49152 entries"),  # the whole tokenizer
    (["generate", "MODEL", "--prompt", "Hello world"], "the tokenizer has 49152 entries"),
    (["generate", "MODEL", "--prompt", "a b c"], "the tokenizer has 49152 entries"),  # ids 81, 278, 265: they fit
])
def test_a_tokenizer_that_does_not_belong_to_the_model_is_refused_in_one_wording(command, found, tmp_path, capsys,
                                                                                  no_model_load):
    folder = tmp_path / "mismatched"
    tiny_model("llama", hidden=64, intermediate=128, vocab=320).save_pretrained(folder)
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(folder)
    message = error_of([str(folder) if arg == "MODEL" else arg for arg in command] + ["--device", "cpu"], capsys)
    assert found in message
    assert message.endswith("but the model's vocabulary has 320 entries: the tokenizer in the folder does not belong "
                            "to the model")


def test_a_shard_size_needs_its_unit(capsys):
    assert "like 5GB" in error_of(["export", "ckpt", "--out", "x", "--max-shard-size", "abc"], capsys)
    assert cli.shard_size("1.5GB") == "1.5GB"


def test_ignored_flags_are_noted(tiny_model_dir, capsys, reference_backend, no_model_load):
    with pytest.raises(AssertionError, match="was loaded"):  # the note comes first
        main(["generate", str(tiny_model_dir), "--max-new-tokens", "1", "--kv-smooth", "0.3", "--device", "cpu"])
    assert "--kv-smooth is ignored without --kv-bits 8" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="was loaded"):
        main(["quantize", str(tiny_model_dir), "--method", "rtn", "--eval", "--gptq-clip", "--device", "cpu"])
    assert "--gptq-clip ignored: w4a8_rtn does not run GPTQ" in capsys.readouterr().err


def test_sigterm_exits_through_the_clean_up_and_the_handler_is_put_back(tiny_model_dir, monkeypatch):
    import signal

    with pytest.raises(SystemExit) as exited:
        cli._terminated(signal.SIGTERM, None)
    assert exited.value.code == 128 + signal.SIGTERM
    seen = []
    monkeypatch.setattr(cli, "cmd_ppl", lambda args: seen.append(signal.getsignal(signal.SIGTERM)))
    before = signal.getsignal(signal.SIGTERM)
    main(["eval", "ppl", str(tiny_model_dir)])
    assert seen == [cli._terminated] and signal.getsignal(signal.SIGTERM) == before


def test_python_dash_m_qqq_is_the_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qqq", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "quantize" in done.stdout


def test_export_never_replaces_its_checkpoint_or_writes_where_it_cannot(checkpoint, tmp_path, capsys, monkeypatch):
    before = sorted(p.name for p in checkpoint.iterdir())
    for out in (checkpoint, checkpoint.parent):
        assert "what it is made from" in error_of(["export", str(checkpoint), "--out", str(out), "--force"], capsys)
    (tmp_path / "file.txt").write_text("x")
    under_a_file = str(tmp_path / "file.txt" / "ct")
    assert "is a file, not a folder" in error_of(["export", str(checkpoint), "--out", under_a_file], capsys)
    monkeypatch.chdir(tmp_path)
    assert "holds the current folder" in error_of(["export", str(checkpoint), "--out", "."], capsys)
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_a_zero_shot_window_shorter_than_an_answer_names_max_length(tiny_model_dir, capsys):
    pytest.importorskip("lm_eval")
    argv = ["eval", "zeroshot", str(tiny_model_dir), "--tasks", "hellaswag", "--limit", "2", "--max-length", "4",
            "--device", "cpu"]
    assert "raise --max-length" in error_of(argv, capsys)
