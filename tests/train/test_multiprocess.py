"""Two `moeqjax qat` processes (jax.distributed on 127.0.0.1, 2 CPU devices each) equal one
process with 4 devices; a Ctrl-C (SIGINT, passed on as SIGTERM) on one of them saves on both,
and one process resumes it; `moeqjax eval` across two processes equals one process.

The processes run in the background from collection on (tests/train/multiprocess_launch.py)."""

import json
import pathlib
import re

import numpy as np
import pytest

from moeqjax.train.metrics_log import read_metrics
import mesh_launch

RTOL = 1e-5


@pytest.fixture(scope="module")
def multiprocess_runs():
  try:
    out = mesh_launch.background_json("multiprocess")
  except BaseException:
    mesh_launch.forget("multiprocess")
    raise
  moved = out["moved"]
  print(f"two-process check: {out['wall_s']:.1f} s wall since collection, "
        f"{out['children_wall_s']} s its children; one process: {moved.pop('seconds')}")
  yield (pathlib.Path(out["scratch"]), out["outs"], moved, out["lonely"], out["eval_outs"])
  mesh_launch.forget("multiprocess")


def test_two_processes_equal_one_process_with_four_devices(multiprocess_runs):
  scratch, outs, _, _, _ = multiprocess_runs
  facts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  print("two processes:", [f.pop("seconds") for f in facts], "s each")
  assert facts == [{"process": i, "processes": 2, "local_devices": 2, "devices": 4, "exit": 130}
                   for i in range(2)]
  one, two = read_metrics(scratch / "one" / "metrics.jsonl"), read_metrics(
      scratch / "two" / "metrics.jsonl")
  assert [m["step"] for m in one] == [1, 2, 3, 4, 5]
  assert [m["step"] for m in two] == list(range(1, len(two) + 1))
  assert {"train/task", "train/rec", "train/kd", "train/value", "train/struct", "train/lb",
          "train/z", "train/loss", "train/grad_norm"} <= set(one[0])
  for a, b in zip(two, one):
    for key, want in b.items():
      assert abs(a[key] - want) <= RTOL * abs(want), (a["step"], key, a[key], want)
  # Process 0 alone draws the progress bar (each says why it stopped: see the next test).
  (_, err0), (_, err1) = outs
  bar = re.compile(r"qat two: +\d+%\|")
  assert bar.search(err0) and not bar.search(err1)


def test_ctrl_c_on_one_host_saves_on_all_and_resumes_in_one_process(multiprocess_runs):
  """Process 1 alone got SIGINT (Ctrl-C) after step 1, which it passes on as its own SIGTERM to
  JAX's preemption service: both saved at the step the service agreed on and said so; one process
  resumes that checkpoint and lands on the one-process run."""
  scratch, outs, moved, _, _ = multiprocess_runs
  saved = sorted(int(p.name) for p in (scratch / "two" / "ckpt").iterdir() if p.name.isdigit())
  stop = saved[-1]
  assert 2 <= stop < 5, saved  # the notice came after step 1, and the run did not finish
  assert len(read_metrics(scratch / "two" / "metrics.jsonl")) == stop
  for _, err in outs:
    assert (f"preemption notice (SIGTERM or Ctrl-C on a host) at step {stop}; checkpoint saved"
            in err)
  assert moved["devices"] == 4 and moved["processes"] == 1
  assert moved["params_5_moved_vs_one"] <= RTOL
  one = read_metrics(scratch / "one" / "metrics.jsonl")
  resumed = read_metrics(scratch / "moved" / "metrics.jsonl")
  assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
  for a, b in zip(resumed[stop:], one[stop:]):
    for key, want in b.items():
      assert abs(a[key] - want) <= RTOL * abs(want), (a["step"], key, a[key], want)


def test_unreachable_coordinator_is_one_line(multiprocess_runs):
  code, err, port = multiprocess_runs[3]
  assert code == 2 and "\n" not in err, err
  assert f"could not reach the coordinator 127.0.0.1:{port} within 1 s" in err
  assert "start process 0 there with the same --coordinator" in err


def test_eval_across_two_processes_equals_one_process(multiprocess_runs):
  """`moeqjax eval` of the same finished student on two processes (2 devices each) and on one
  process with 4 devices: every metric of eval.json, which process 0 alone writes."""
  scratch, _, _, _, eval_outs = multiprocess_runs
  facts = [json.loads(out.strip().splitlines()[-1]) for out, _ in eval_outs]
  assert facts == [{"process": i, "devices": 4} for i in range(2)]
  one = json.loads((scratch / "one" / "eval.json").read_text())
  two = json.loads((scratch / "eval2" / "eval.json").read_text())
  assert set(two) == set(one) == {"full_precision", "student"}
  assert one["student"]["eval_tokens"] == 7 * 16
  for name in one:
    assert set(two[name]) == set(one[name])
    for key, want in one[name].items():
      got = two[name][key]
      if isinstance(want, (float, list)) and key != "expert_load":
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=f"{name}.{key}")
      else:  # counts, bytes, None, and the integer load shares
        assert got == want or np.allclose(got, want, rtol=0, atol=0), (name, key, got, want)
  # The routing of the student differs from the teacher's somewhere, or the test says nothing.
  assert one["student"]["topk_agree"] < 1.0
  (out0, _), (out1, _) = eval_outs
  assert "student" in out0 and "student" not in out1  # the summary table: process 0 only
