"""tpu_scripts/tpu.py --dry-run prints every gcloud command of each action and runs none."""

import importlib.util
import pathlib
import shlex

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "tpu_scripts" / "tpu.py"
WHERE = ["--name", "mq", "--zone", "us-east5-a", "--project", "proj"]
Z = "--zone=us-east5-a --project=proj"


@pytest.fixture
def tpu(monkeypatch):
  spec = importlib.util.spec_from_file_location("tpu_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def refuse(*args, **kwargs):
    raise AssertionError(f"--dry-run ran {args}")

  monkeypatch.setattr(module.subprocess, "run", refuse)
  return module


def dry(tpu, capsys, action, *argv):
  # --dry-run right after the action: after `--` it would belong to the moeqjax command.
  assert tpu.main([action, "--dry-run", *argv]) == 0
  return capsys.readouterr().out.splitlines()


def test_create_and_delete(tpu, capsys):
  assert dry(tpu, capsys, "create", *WHERE, "--accelerator", "v5p-64") == [
      f"gcloud compute tpus tpu-vm create mq {Z} --accelerator-type=v5p-64 --version=v2-alpha-tpuv5"]
  assert dry(tpu, capsys, "create", *WHERE, "--accelerator", "v5litepod-16", "--queued",
             "--spot") == [
      f"gcloud compute tpus queued-resources create mq {Z} --node-id=mq "
      "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot"]
  assert dry(tpu, capsys, "delete", *WHERE) == [f"gcloud compute tpus tpu-vm delete mq {Z} --quiet"]
  assert dry(tpu, capsys, "delete", *WHERE, "--queued") == [
      f"gcloud compute tpus queued-resources delete mq {Z} --force --quiet"]


def test_install_launch_logs(tpu, capsys):
  source = str(SCRIPT.parents[1])
  lines = dry(tpu, capsys, "install", *WHERE)
  assert lines[1] == (f"gcloud compute tpus tpu-vm scp --recurse {source} 'mq:~/moeqjax' {Z} "
                      "--worker=all")
  assert shlex.split(lines[2])[-1] == (
      "--command=python3 -m pip install --upgrade pip && python3 -m pip install -e ~/moeqjax "
      "'jax[tpu]'")
  assert all("--worker=all" in line for line in lines)
  lines = dry(tpu, capsys, "launch", *WHERE, "--env", "XLA_FLAGS=--a --b", "--", "qat", "--config",
              "configs/mixtral_8x7b.py", "--workdir", "/mnt/shared/run")
  assert len(lines) == 1
  argv = shlex.split(lines[0])
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mq"]
  assert "--worker=all" in argv
  assert argv[-1] == ("--command=cd ~/moeqjax && XLA_FLAGS='--a --b' nohup python3 -m moeqjax.cli "
                      "qat --coordinator auto --config configs/mixtral_8x7b.py --workdir /mnt/shared/run > "
                      "~/moeqjax_run.log 2>&1 < /dev/null &")
  # A coordinator the user names is kept; eval takes the flag too; commands without it get none.
  for given, want in ((["qat", "--coordinator", "10.0.0.2:1234"], "qat --coordinator 10.0.0.2:1234"),
                      (["eval", "--workdir", "w"], "eval --coordinator auto --workdir w"),
                      (["stats", "--workdir", "w"], "stats --workdir w")):
    line = dry(tpu, capsys, "launch", *WHERE, "--", *given)[0]
    assert f"moeqjax.cli {want} >" in shlex.split(line)[-1]
  assert dry(tpu, capsys, "logs", *WHERE) == [
      f"gcloud compute tpus tpu-vm ssh mq {Z} --worker=0 '--command=tail -n 200 -f "
      "~/moeqjax_run.log'"]


def test_bad_input_is_one_line(tpu, capsys, tmp_path):
  for argv, says in ((["create", *WHERE, "--accelerator", "v9-8"], "no default runtime version"),
                     (["install", *WHERE, "--source", str(tmp_path)], "not the moeqjax checkout"),
                     (["launch", *WHERE], "give the moeqjax command after --"),
                     (["launch", *WHERE, "--env", "NOVALUE", "--", "qat"], "is not KEY=VALUE")):
    assert tpu.main([argv[0], "--dry-run", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
