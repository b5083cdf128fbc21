"""User errors are one line on stderr with exit code 2 and no traceback."""

import os

import pytest

from moeqjax.cli import main


def _run(capsys, *argv):
  code = main(list(argv))
  err = capsys.readouterr().err
  return code, err


@pytest.mark.parametrize("argv,words", [
    (["--config.model.num_expertz=4"], "unknown config key 'model.num_expertz'"),
    (["--config.model.top_k=9"], "top_k=9 must be between 1 and model.num_experts=8"),
    (["--config.quant.expert_code=5"], "expert_code=5 is unsupported"),
    (["--config.model.num_layers=two"], "expected an integer"),
    (["--config.quant.scale_init=best"], "scale_init='best' is unsupported; choose from"),
    (["--config.quant.learn_clip=True", "--config.quant.learn_scale=True"], "choose one"),
    (["--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["--config.mesh.data=2"], "mesh data=2 x fsdp=1 x expert=1 x tensor=1 has 2 devices but 1 "
     "are present; make the product 1"),
    (["--config.mesh.logical_axis_rules=(('mlp', 'model'),)"],
     "maps 'mlp' to unknown mesh axis 'model'"),
])
def test_bad_input_is_one_line_error(capsys, tmp_path, argv, words):
  code, err = _run(capsys, "pretrain", "--workdir", str(tmp_path / "w"), *argv)
  assert code == 2
  assert err.startswith("moeqjax: error:") and words in err
  assert "Traceback" not in err and err.count("\n") == 1


def test_unknown_key_lists_valid_keys(capsys, tmp_path):
  code, err = _run(capsys, "pretrain", "--workdir", str(tmp_path), "--config.modle.d_model=8")
  assert code == 2 and "valid keys there:" in err and "model" in err and "pretrain" in err


def test_empty_data_folder(capsys, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  code, err = _run(capsys, "pretrain", "--workdir", str(tmp_path / "w"), "--data", str(empty))
  assert code == 2 and str(empty) in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_workdir(capsys, tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  code, err = _run(capsys, "pretrain", "--workdir", str(locked / "sub"))
  assert code == 2 and "writable" in err


def test_workdir_that_is_a_file(capsys, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  code, err = _run(capsys, "pretrain", "--workdir", str(blocker / "sub"))
  assert code == 2 and "--workdir" in err and "writable" in err


@pytest.mark.parametrize("argv,flag", [
    (["qat", "--workdir", "gs://bucket/run", "--teacher", "t"], "--workdir gs://bucket/run"),
    (["eval", "--workdir", "w", "--teacher", "gs://bucket/teacher"], "--teacher gs://bucket/teacher"),
    (["pretrain", "--data", "s3://bucket/corpus.txt"], "--data s3://bucket/corpus.txt"),
    (["pack", "--workdir", "w", "--out", "gs://bucket/packed"], "--out gs://bucket/packed"),
    (["qat", "--teacher", "t", "--init-from", "gs://b/ptq"], "--init-from gs://b/ptq"),
])
def test_urls_are_refused_not_made_into_local_folders(capsys, tmp_path, monkeypatch, argv, flag):
  """`gs://b/run` would otherwise become a local folder `gs:/b/run`, written as if it were GCS."""
  monkeypatch.chdir(tmp_path)
  code, err = _run(capsys, *argv)
  assert code == 2 and err.count("\n") == 1
  assert err == (f"moeqjax: error: {flag}: URLs are not supported; mount the bucket (e.g. "
                 f"gcsfuse, or a Filestore/NFS share on every host) and pass "
                 f"{flag.split()[0]} the mounted path\n")
  assert list(tmp_path.iterdir()) == []  # nothing was created
