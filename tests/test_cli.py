"""What every command does on Ctrl-C: one line, exit 130 (the shell's code for SIGINT), no traceback."""
import importlib

import pytest


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("module, function, argv", [
    ("evaluate", "load_for_inference", ["--ckpt", "model.pth"]),
    ("demo", "list_inputs", ["--ckpt", "model.pth", "image.png"]),
    ("export", "load_for_inference", ["--ckpt", "model.pth"]),
    ("check_data", "dataset_samples", ["--config", "synthetic"]),
    ("train", "train", ["--config", "synthetic"]),
    ("synthetic", "generate", []),
])
def test_ctrl_c_is_one_line_and_exit_130(module, function, argv, tmp_path, monkeypatch, capsys):
    cli = importlib.import_module(module)
    monkeypatch.chdir(tmp_path)  # nothing written into the repository if the interruption came late
    monkeypatch.setattr(cli, function, interrupt)
    if module == "synthetic":
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        code = exited.value.code
    else:
        code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 130
    assert err.startswith("interrupted (Ctrl-C)") and err.count("\n") == 1 and "Traceback" not in err
