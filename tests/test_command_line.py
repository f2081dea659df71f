"""What a user of ``python -m monai.bundle run ...`` sees (``scripts.runtime.command_line``): ``--help`` prints the
workflow's ids and does no work; an error ends in one line (the bundle's own message), the traceback only with
``BRAINSYNTH_VERBOSE=1``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, files_in

from scripts.runtime import command_line


def bundle_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run", *args, "--bundle_root", "bundle"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_help_prints_the_ids_and_does_no_work(tmp_path):
    out = tmp_path / "out"
    result = bundle_run("inference", "--config_file", "bundle/configs/inference.json", "--output_dir", str(out),
                        "--help")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "workflow: inference.json" in result.stdout
    for option in ("--input ", "--dataset_dir ", "--ckpt_path ", "--overwrite ", "--backend "):
        assert option in result.stdout
    assert not out.exists() and not (REPO / "bundle" / "eval").exists()


def test_help_of_an_overlay_lists_the_merged_ids(tmp_path):
    stack = "['bundle/configs/train.json','bundle/configs/evaluate.json']"
    result = bundle_run("--config_file", stack, "--output_dir", str(tmp_path / "out"), "--help")
    assert result.returncode == 0, result.stderr
    assert "workflow: train.json + evaluate.json" in result.stdout
    assert "--baselines " in result.stdout and "--split " in result.stdout and "--learning_rate " in result.stdout
    assert files_in(tmp_path) == []


def test_an_error_ends_in_the_one_line_of_the_bundle(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "datalist.json").write_text(json.dumps({"layout": "brats2021", "test": [{"case": "c1", "image": "x"}]}))
    args = ("--config_file", "bundle/configs/inference.json", "--dataset_dir", str(data), "--datalist_split", "tset",
            "--output_dir", str(tmp_path / "out"))  # fmt: skip
    result = bundle_run(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"ValueError: {data / 'datalist.json'} has no cases in split 'tset' (splits present: ['test'])"
    )
    assert not (tmp_path / "out").exists()
    verbose = bundle_run(*args, env={command_line.VERBOSE_ENV: "1"})
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


@pytest.mark.parametrize("config,typo,meant", [
    ("bundle/configs/inference.json", "ckpt_pth", "ckpt_path"),
    ("bundle/configs/train.json", "max_epoch", "max_epochs"),
    ("bundle/configs/train.json", "dataset_dri", "dataset_dir"),
])  # fmt: skip
def test_a_misspelt_option_stops_the_workflow_in_one_line_naming_the_id_meant(config, typo, meant, tmp_path):
    out = tmp_path / "out"
    result = bundle_run("--config_file", config, "--output_dir", str(out), f"--{typo}", "1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"unknown option --{typo}: {os.path.basename(config)} has no id {typo!r}; did you mean --{meant}?")
    assert not out.exists()


def test_overrides_of_existing_ids_nested_ones_and_monai_options_are_known():
    files = [str(REPO / "bundle" / "configs" / "train.json")]
    argv = ["--max_epochs", "2", "--train#dataloader#num_workers", "0", "--config_file", "x", "--meta_file", "m"]
    assert command_line.unknown_overrides(files, argv) == []
    assert command_line.unknown_overrides(files, ["--trian#dataloader", "1", "--zzzz", "1"]) == [
        ("trian#dataloader", "train#dataloader"), ("zzzz", None)]


def test_one_line_is_the_innermost_error_with_its_lines_joined():
    try:
        try:
            raise FileNotFoundError("No datalist at D/datalist.json.\nMake the phantom set with\n  python ...")
        except FileNotFoundError as e:
            raise RuntimeError("Failed to instantiate component 'x'") from e
    except RuntimeError as outer:
        assert command_line.one_line(outer) == (
            "FileNotFoundError: No datalist at D/datalist.json. Make the phantom set with python ..."
        )


def test_config_files_reads_either_form_of_config_file():
    assert command_line.config_files(["run", "--config_file", "a.json"]) == ["a.json"]
    assert command_line.config_files(["--config_file", "['a.json','b.json']"]) == ["a.json", "b.json"]
    assert command_line.config_files(["--config_file=a.json,b.json"]) == ["a.json", "b.json"]
    assert command_line.config_files(["run"]) == []


def test_missing_segmenter_stops_training_at_once_with_the_command_that_makes_it(tmp_path):
    out = tmp_path / "runs"
    result = bundle_run("--config_file", "bundle/configs/train.json", "--dataset_dir", str(tmp_path / "nowhere"),
                        "--output_dir", str(out), "--variant", "tcmgan")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{out / 'segmenter' / 'model.pt'}: no pre-trained segmenter, which tcmgan needs: ")
    assert "'bundle/configs/train_segmenter.json'" in last and last.endswith("or give --segmenter_ckpt")
    assert not out.exists()


def test_a_gpu_device_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the check speaks only on machines without CUDA")
    out = tmp_path / "out"
    result = bundle_run("inference", "--config_file", "bundle/configs/inference.json", "--output_dir", str(out),
                        "--device", "cuda")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"--device cuda: no CUDA GPU is available to this torch {torch.__version__}; give --device cpu"
    )
    assert not out.exists()


def test_a_tool_stops_on_an_unknown_option_before_any_work(tmp_path):
    """``reproduce.py --seeds 2`` (before ``--seeds`` existed) ran the whole study, then complained about it."""
    out = tmp_path / "study"
    command = [sys.executable, "tools/reproduce.py", "--preset", "smoke", "--sedes", "2", "--output_dir",
               str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "reproduce.py: unknown option --sedes; the options are --preset, --output_dir, --dataset_dir, --device, "
        "--seeds, --jobs, --keep_to"
    )


def test_check_options_knows_sub_commands_and_negated_flags():
    def tool(output_dir, overwrite=False):
        return output_dir

    command_line.check_options(tool, ["--output_dir", "x", "--nooverwrite"], "t")
    command_line.check_options({"make": tool}, ["make", "--output_dir=x"], "t")
    with pytest.raises(SystemExit, match="t: unknown sub-command 'mak'; expected one of make"):
        command_line.check_options({"make": tool}, ["mak"], "t")
    with pytest.raises(SystemExit, match="t: unknown option --output; the options are --output_dir, --overwrite"):
        command_line.check_options(tool, ["--output", "x"], "t")


# --- yes/no options given as words -------------------------------------------------------------------------------


def test_flag_reads_the_words_a_command_line_gives():
    assert [command_line.flag(v) for v in ("true", "True", "1", "yes", True)] == [True] * 5
    assert [command_line.flag(v) for v in ("false", "FALSE", "0", "no", "", False, None)] == [False] * 7
    with pytest.raises(ValueError, match=r"^--overwrite 'maybe': expected true or false$"):
        command_line.flag("maybe", "overwrite")


def _parsed(config: str, **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(REPO / "bundle" / "configs" / config), workflow_type="infer",
                              bundle_root=str(REPO / "bundle"), **overrides)  # fmt: skip
    return workflow.parser


@pytest.mark.parametrize("word", ["false", "true"])
def test_inference_takes_false_as_false(word, tmp_path):
    """``python -m monai.bundle run ... --check_contrast false`` hands the config the string 'false' (fire keeps
    lower-case words as strings), which Python takes as true: the contrast check and background writing could not be
    turned off from the command line."""
    parser = _parsed("inference.json", input=str(tmp_path / "t2.nii.gz"), output_dir=str(tmp_path / "out"),
                     check_contrast=word, background_write=word, overwrite=word, compile=word)  # fmt: skip
    expected = word == "true"
    load = next(t for t in parser.get_parsed_content("preprocessing").transforms if type(t).__name__ == "LoadInputsd")
    assert load.check_contrast is expected
    assert parser.get_parsed_content("writer").enabled is expected


def test_training_refuses_to_replace_a_model_when_overwrite_is_false(tmp_path):
    (tmp_path / "tcmgan").mkdir()
    (tmp_path / "tcmgan" / "model.pt").write_bytes(b"an earlier run's model")
    parser = _parsed("train.json", output_dir=str(tmp_path), overwrite="false", resume="false")
    with pytest.raises(SystemExit, match="holds the model of an earlier run"):
        parser.get_parsed_content("output_check")
    assert _parsed("train.json", output_dir=str(tmp_path), overwrite="true").get_parsed_content("output_check")
