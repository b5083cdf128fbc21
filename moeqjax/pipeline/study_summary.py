"""The study's seed statistics: mean and std per (objective, method, budget), winners and paired noise tests."""

from __future__ import annotations

import math

import numpy as np

from moeqjax.eval.control import control_comparison
from moeqjax.eval.paired import paired_difference

# Two-sided 95% t critical values by degrees of freedom (paired test over seeds).
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def summ(values) -> dict:
  """Mean, sample std and count of a list of numbers."""
  arr = np.asarray(values, np.float64)
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
          "n": int(arr.size)}


def summarize(data: dict) -> dict:
  """Mean +- std over seeds per (objective, method, budget), winners and paired noise tests."""
  st = data["meta"]["settings"]
  groups: dict = {}
  for c in data["cells"].values():
    groups.setdefault((c["objective"], c["method"], c["budget"]), []).append(c)
  table = {}
  for (o, m, b), cells in groups.items():
    cells = sorted(cells, key=lambda c: c["seed"])
    table[f"{o}|{m}|{b:g}"] = {
        "objective": o, "method": m, "budget": b, "seeds": [c["seed"] for c in cells],
        "bits_per_byte": summ([c["bits_per_byte"] for c in cells]),
        "bpb_by_seed": [c["bits_per_byte"] for c in cells],
        "topk_agree": summ([c["topk_agree"] for c in cells]),
        "top1_agree": summ([c["top1_agree"] for c in cells]),
        "topk_agree_per_layer": np.mean([c["topk_agree_per_layer"] for c in cells], 0).tolist(),
        "expert_bits_per_weight": summ([c["expert_bits_per_weight"] for c in cells]),
        "expert_code_bits": summ([c["expert_code_bits"] for c in cells]),
        "expert_bytes": summ([c["expert_bytes"] for c in cells])}
    paired = _against_teacher_and_control(data, o, cells)
    if paired is not None:
      table[f"{o}|{m}|{b:g}"]["paired"] = paired
  main = st["main_budget"]
  at_main = [r for r in table.values() if r["budget"] == main]
  obj_means = {}
  for o in st["objectives"]:
    rows = [r["bits_per_byte"]["mean"] for r in at_main if r["objective"] == o]
    if rows:
      obj_means[o] = float(np.mean(rows))
  best_obj = min(obj_means, key=obj_means.get) if obj_means else None
  winners = {}
  for o in st["objectives"]:
    for b in sorted({r["budget"] for r in table.values() if r["objective"] == o}):
      rows = sorted([r for r in table.values() if r["objective"] == o and r["budget"] == b],
                    key=lambda r: r["bits_per_byte"]["mean"])
      if len(rows) < 2:
        continue
      w = {"objective": o, "budget": b, "ranking": [r["method"] for r in rows],
           "best": rows[0]["method"], "best_bpb": rows[0]["bits_per_byte"]["mean"]}
      for other_name, other in (("second", rows[1]),
                                ("uniform", next((r for r in rows if r["method"] == "uniform"), None))):
        if other is None or other is rows[0]:
          continue
        w[f"vs_{other_name}"] = _paired(rows[0], other)
      winners[f"{o}|{b:g}"] = w
  return {"table": table, "objective_mean_bpb_at_main": obj_means,
          "best_objective_at_main": best_obj, "winners": winners,
          "controls": controls_table(data),
          "ptq_table": ptq_table(data.get("ptq_cells", {}),
                                 data.get("reference", {}).get("bits_per_window")),
          "lambda_noise": lambda_noise(data),
          "comparisons": _count_comparisons(winners)}


def _ranks(x: np.ndarray) -> np.ndarray:
  """Average ranks (ties share their mean rank), as Spearman's correlation uses."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(len(x), dtype=np.float64)
  for value in np.unique(x):
    tied = x == value
    ranks[tied] = ranks[tied].mean()
  return ranks


def spearman(a, b) -> float:
  """Spearman's rank correlation of two equal-length vectors (nan when either is constant)."""
  ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
  if ra.std() == 0 or rb.std() == 0:
    return math.nan
  return float(np.corrcoef(ra, rb)[0, 1])


def lambda_noise(data: dict) -> dict | None:
  """How well two independent fine-tunes agree: per layer, Spearman's rank correlation of their
  Lambdas (and of the final router norms); per statistics-driven method and budget, the share of
  experts whose code differs between the allocations read from each. None without a replicate."""
  rep = data.get("lambda_replicate")
  if rep is None or "stats" not in data:
    return None
  lam1, lam2 = np.asarray(data["stats"]["lambda"]), np.asarray(rep["lambda"])
  norm1, norm2 = (np.asarray(data["stats"]["router_norm_now"]),
                  np.asarray(rep["router_norm_now"]))
  changed = {}
  for key, codes2 in data.get("replicate_allocations", {}).items():
    method, budget = key.split("|")
    first = data["allocations"].get(f"{method}|{budget}|0")
    if first is not None:
      changed[key] = float(np.mean(np.asarray(first["codes_LxE"]) != np.asarray(codes2)))
  return {"lambda_spearman_per_layer": [spearman(a, b) for a, b in zip(lam1, lam2)],
          "router_norm_spearman_per_layer": [spearman(a, b) for a, b in zip(norm1, norm2)],
          "codes_changed": changed}


def _count_comparisons(winners: dict) -> int:
  """How many "best vs runner-up / vs uniform" tests the winner lines make (the multiplicity)."""
  return sum(("vs_second" in w) + ("vs_uniform" in w) for w in winners.values())


def _windows(record: dict) -> dict:
  return {"bits": np.asarray(record["bits_per_window"], np.float64),
          "topk_agree": np.asarray(record["topk_agree_per_window"], np.float64),
          "top1_agree": np.asarray(record["top1_agree_per_window"], np.float64)}


def _against_teacher_and_control(data: dict, objective: str, cells: list) -> dict | None:
  """A row's Δ bits against the teacher and against its objective's control, and its routing drift
  beyond the control's (eval.control.control_comparison on the seed-averaged per-window values,
  each seed paired with the control of the same seed: the standard errors count window noise), and
  the same per seed (their spread is the seed noise). None when the cells or the control predate
  per-window values."""
  control = data.get("controls", {}).get(objective, {}).get("by_seed")
  ref = data.get("reference", {}).get("bits_per_window")
  seeds = [str(c["seed"]) for c in cells]
  if (ref is None or not control or any(s not in control for s in seeds)
      or any("bits_per_window" not in c for c in cells)):
    return None
  teacher = {"bits": np.asarray(ref, np.float64)}

  def compare(rows, ctls):
    mean = {k: np.mean([r[k] for r in rows], axis=0) for k in ("bits", "topk_agree", "top1_agree")}
    ctl = {k: np.mean([r[k] for r in ctls], axis=0) for k in ("bits", "topk_agree", "top1_agree")}
    return control_comparison({"teacher": teacher, "control": ctl, "row": mean},
                              teacher="teacher", control="control")["row"]

  rows = [_windows(c) for c in cells]
  ctls = [_windows(control[s]) for s in seeds]
  out = compare(rows, ctls)
  per_seed = [compare([r], [c]) for r, c in zip(rows, ctls)]
  for key in ("delta_vs_teacher", "delta_vs_control", "drift_topk", "drift_top1"):
    out[key + "_by_seed"] = [p[key] for p in per_seed]
  return out


def controls_table(data: dict) -> dict:
  """Each objective's full-precision control: bits, Δ vs the teacher and agreement, over seeds."""
  ref = data.get("reference", {}).get("bits_per_window")
  out = {}
  for objective, ctl in data.get("controls", {}).items():
    by_seed = ctl.get("by_seed") if isinstance(ctl, dict) else None
    if not isinstance(by_seed, dict) or ref is None:  # the CE-only control of older files
      continue
    seeds = sorted(by_seed, key=int)
    windows = {"teacher": {"bits": np.asarray(ref, np.float64)}}
    windows["control"] = {k: np.mean([_windows(by_seed[s])[k] for s in seeds], axis=0)
                          for k in ("bits", "topk_agree", "top1_agree")}
    row = control_comparison(windows, teacher="teacher", control=None)["control"]
    row.update(objective=objective, seeds=[int(s) for s in seeds],
               bits_per_byte=summ([by_seed[s]["bits_per_byte"] for s in seeds]),
               topk_agree_by_seed=[by_seed[s]["topk_agree"] for s in seeds])
    out[objective] = row
  return out


def ptq_table(cells: dict, teacher_windows=None) -> dict:
  """Post-training rows per (PTQ method, allocation method, budget): mean +- std over seeds (only
  "random" has more than one) and the rank of each allocation method within (PTQ method, budget).

  With per-window values (and the teacher's, `teacher_windows`): each row's Δ vs the teacher and
  vs uniform at the same PTQ method and budget, each ± its standard error paired over the windows
  (the seed-averaged windows for random; window noise only)."""
  groups: dict = {}
  for c in cells.values():
    groups.setdefault((c["ptq"], c["method"], c["budget"]), []).append(c)
  table = {}
  for (p, m, b), rows in groups.items():
    table[f"{p}|{m}|{b:g}"] = {
        "ptq": p, "method": m, "budget": b, "seeds": sorted(c["seed"] for c in rows),
        "bits_per_byte": summ([c["bits_per_byte"] for c in rows]),
        "topk_agree": summ([c["topk_agree"] for c in rows]),
        "expert_bytes": summ([c["expert_bytes"] for c in rows]),
        "expert_code_bits": summ([c["expert_code_bits"] for c in rows])}
  for r in table.values():
    same = sorted((o for o in table.values() if o["ptq"] == r["ptq"] and o["budget"] == r["budget"]),
                  key=lambda o: o["bits_per_byte"]["mean"])
    r["rank"] = 1 + same.index(r)
  windows = {key: np.mean([c["bits_per_window"] for c in rows], axis=0)
             for key, rows in groups.items() if all("bits_per_window" in c for c in rows)}
  for (p, m, b), row_windows in windows.items():
    r = table[f"{p}|{m}|{b:g}"]
    if teacher_windows is not None:
      r["delta_vs_teacher"], r["delta_vs_teacher_se"] = paired_difference(row_windows,
                                                                          teacher_windows)
    uniform = windows.get((p, "uniform", b))
    if uniform is not None and m != "uniform":
      r["delta_vs_uniform"], r["delta_vs_uniform_se"] = paired_difference(row_windows, uniform)
  return table


def _paired(a: dict, b: dict) -> dict:
  """Paired (same seeds = same batches) difference b - a in bits per byte, and whether |t| > t95."""
  seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
  da = dict(zip(a["seeds"], a["bpb_by_seed"]))
  db = dict(zip(b["seeds"], b["bpb_by_seed"]))
  d = np.array([db[s] - da[s] for s in seeds])
  out = {"method": b["method"], "margin_bpb": float(d.mean()) if d.size else math.nan,
         "n": int(d.size)}
  if d.size >= 2:
    sd = float(d.std(ddof=1))
    if sd > 0:
      t = float(d.mean() / (sd / math.sqrt(d.size)))
    else:  # identical allocations give identical runs: no difference at all
      t = 0.0 if d.mean() == 0 else math.copysign(math.inf, d.mean())
    out.update(sd=sd, t=t, t95=_T95.get(d.size - 1, 2.0), beats_noise=bool(abs(t) > _T95.get(d.size - 1, 2.0)))
  else:
    out.update(beats_noise=False)
  return out
