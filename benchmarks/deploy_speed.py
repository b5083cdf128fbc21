"""Deployment table: bytes, memory and speed of one random MoE in llama.cpp and in moeqjax (JAX)."""

# Run:  python benchmarks/deploy_speed.py               (default: the model of issue 20; under
#                                                        24 GiB; wants a quiet machine)
#       python benchmarks/deploy_speed.py --small       (a tiny model, to check the script itself)
#       python benchmarks/deploy_speed.py --layers 16 --d-model 2048 --json out.json   (bigger)
#
# One llama-arch (Mixtral-like) MoE with random weights is built in moeqjax, then written by
# moeqjax: as GGUF files (F16, Q8_0 = int8 experts, Q4_0 = int4, TQ2_0 = ternary 2-bit packing,
# TQ1_0 = ternary base-3 packing, and the target-aware mix: `allocate --target gguf` at 2.5 bits per
# expert weight, one exact type per (layer, projection); attention,
# embedding and output F16 in every file) and as moeqjax checkpoints of the same students (bf16
# params unpacked, and `moeqjax.serve.pack` folders read back by `load_packed`). Weights are
# random: speed does not depend on what they learned, and quality is not measured here.
#
# Each (row, thread count) runs in its own worker process, started once: it pins itself to that
# many CPUs (os.sched_setaffinity, before llama.cpp or XLA start their thread pools; llama.cpp also
# gets n_threads), loads its model, reads its resident memory from /proc/self/status, runs one
# warm-up generation (not reported), then waits. Rounds are interleaved: round r asks every worker
# of a thread count for one timed generation, then round r + 1 starts; the table shows the median
# and [min-max] over rounds. Every row gets the same prompt (fixed random token ids), batch 1, and
# greedy decoding of exactly --new-tokens tokens (llama.cpp: ignore_eos; a run that stops early or
# reuses a cached prompt is an error). Speeds are llama.cpp's own timings from the completion
# response ("timings": prompt_per_second, and predicted_per_second, which divides the n - 1 decode
# steps after the first sampled token by their time), and moeqjax.serve.generate's
# prefill_tokens_per_s / decode_tokens_per_s (the same definitions; compilation excluded). Ratios
# are to F16 (llama.cpp rows) or bf16 (JAX rows) at the same thread count, measured in the same run.
# Nothing here asserts a time.

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

MARK = "@@deploy_speed "  # prefixes a worker's result lines; anything else on its stdout is a log
LLAMA, JAX = "llama.cpp", "moeqjax JAX"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One student: its expert codes (None: full precision) and ternary packing, and its row names."""

  key: str
  llama_name: str
  jax_name: str
  code: int | str | None  # one code for every expert, "mixed", or None (unquantized)
  packing: str = "2bit"


VARIANTS = (
    Variant("fp", "F16", "bf16", None),
    Variant("int8", "Q8_0", "packed int8", 8),
    Variant("int4", "Q4_0", "packed int4", 4),
    Variant("ternary", "TQ2_0", "packed ternary 2-bit", 1),
    Variant("ternary_b3", "TQ1_0", "packed ternary base-3", 1, "base3"),
    Variant("mixed", "per-layer mix", "packed per-layer mix", "mixed"),
)


def _rss() -> dict:
  """{"rss", "peak"} bytes of this process from /proc/self/status (VmRSS, VmHWM)."""
  out = {}
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    key, _, value = line.partition(":")
    if key in ("VmRSS", "VmHWM"):
      out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
  return out


def _pin(threads: int):
  """Restricts this process to its first `threads` allowed CPUs (before any thread pool starts)."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads > len(cpus):
    raise SystemExit(f"--threads {threads} exceeds the {len(cpus)} CPUs this process may use")
  os.sched_setaffinity(0, cpus[:threads])


def _emit(record: dict):
  sys.stdout.write(MARK + json.dumps(record) + "\n")
  sys.stdout.flush()


def _serve(load, run_once):
  """The worker loop: load, warm up once, report memory, then one timed run per "run" line."""
  base = _rss()
  handle = load()
  loaded = _rss()
  run_once(handle)  # warm-up: first-use costs (allocation, page faults, caches) are not timed
  warm = _rss()
  _emit({"ready": True, "rss_load": loaded["rss"] - base["rss"],
         "peak_load": loaded["peak"] - base["rss"], "rss_run": warm["rss"] - base["rss"],
         "peak": warm["peak"] - base["rss"]})
  for line in sys.stdin:
    if line.strip() != "run":
      break
    _emit(run_once(handle))


def llama_worker(spec: dict):
  """A llama.cpp (xllamacpp) worker: one server, one slot, batch 1."""
  _pin(spec["threads"])
  import xllamacpp
  prompt, new = spec["prompt"], spec["new_tokens"]

  def load():
    p = xllamacpp.CommonParams()
    p.model.path = spec["path"]
    p.n_ctx = len(prompt) + new + 8
    p.n_batch = p.n_ubatch = p.n_ctx  # the whole prompt in one batch
    p.n_parallel = 1
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = spec["threads"]
    p.n_threads_http = 1
    p.n_gpu_layers = 0
    # NONE reads the weights into memory at load (as the JAX rows do), so resident memory after
    # load is the weights; with MMAP pages come in as experts are first used.
    p.load_mode = getattr(xllamacpp.llama_load_mode, f"LLAMA_LOAD_MODE_{spec['load_mode'].upper()}")
    p.cache_ram_mib = 0  # no host prompt cache: every request evaluates its whole prompt
    p.fit_params = False
    p.warmup = False  # the worker's own warm-up request replaces it
    p.verbosity = 1
    return xllamacpp.Server(p)

  def run_once(server):
    res = server.handle_completions({
        "prompt": prompt, "max_tokens": new, "temperature": 0.0, "cache_prompt": False,
        # llama.cpp gives a BPE vocabulary without an eos key a default end-of-generation id, so
        # a random model could stop early; ignore_eos only biases those ids' logits to -inf (no
        # measurable cost next to a forward pass, and quality is not measured here).
        "ignore_eos": True, "n_probs": 0})
    if "error" in res:
      raise RuntimeError(f"llama.cpp refused the request: {res['error']}")
    t = res["timings"]
    if t["prompt_n"] != len(prompt) or t.get("cache_n", 0) or t["predicted_n"] != new:
      raise RuntimeError(f"llama.cpp evaluated {t['prompt_n']} prompt tokens ({t.get('cache_n')} "
                         f"cached) and generated {t['predicted_n']}; the benchmark needs "
                         f"{len(prompt)} uncached and exactly {new}")
    return {"prefill": t["prompt_per_second"], "decode": t["predicted_per_second"]}

  _serve(load, run_once)


def jax_worker(spec: dict):
  """A moeqjax worker: bf16 params, or a packed checkpoint via load_packed; serve.generate."""
  _pin(spec["threads"])
  import jax
  # The timed generate compiles its steps again each call (its own jit); the persistent cache
  # makes that a lookup. Compilation is excluded from its timings either way.
  jax.config.update("jax_compilation_cache_dir", spec["jax_cache"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.devices()  # the runtime starts before the memory baseline
  import jax.numpy as jnp
  from moeqjax.convert.safetensors_io import read_header, read_tensor
  from moeqjax.model import MoETransformer
  from moeqjax.serve import generate, load_packed
  from moeqjax.serve.checkpoint import model_config_from_record
  prompt = np.asarray([spec["prompt"]], np.int32)

  def load():
    if spec["kind"] == "packed":
      packed = load_packed(spec["path"])
      model, variables = packed.model, packed.variables
    else:
      path = pathlib.Path(spec["path"])
      cfg = model_config_from_record(json.loads((path.parent / "config.json").read_text()))
      params = {}
      for name, info in read_header(path).items():
        *parents, leaf = name.split("/")
        node = params
        for k in parents:
          node = node.setdefault(k, {})
        node[leaf] = jnp.asarray(read_tensor(info))
      model, variables = MoETransformer(cfg), {"params": params}
    jax.block_until_ready(variables)
    return model, variables

  def run_once(handle):
    model, variables = handle
    g = generate(model, variables, prompt, spec["new_tokens"])
    if g.tokens.shape[1] != spec["new_tokens"]:
      raise RuntimeError(f"generate made {g.tokens.shape[1]} tokens, not {spec['new_tokens']}")
    return {"prefill": g.prefill_tokens_per_s, "decode": g.decode_tokens_per_s,
            "compile_s": g.compile_s}

  _serve(load, run_once)


# ---------------------------------------------------------------------------------------------
# The parent: build the student, write every file, drive the workers, print the table.


def model_config(args, packing: str):
  from moeqjax.model import ModelConfig, QuantRules
  return ModelConfig(
      vocab_size=256, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
      num_kv_heads=args.kv_heads, head_dim=args.d_model // args.heads, d_ff=args.d_ff,
      num_experts=args.experts, top_k=args.top_k, dtype="bfloat16",
      max_seq_len=args.prompt + args.new_tokens + 8,
      # Per-output-channel fp16 scales: constant over each 256-wide input block, so every ggml
      # block type holds the codes exactly (nothing re-quantized on export).
      quant=QuantRules(expert_code=1, granularity="channel", ternary_packing=packing))


def mixed_codes(arg: str, cfg, params) -> np.ndarray:
  """Codes of the mixed row: `gguf:B` (default gguf:2.5), the target-aware allocation
  (moeqjax.alloc.gguf_target.allocate_gguf, method exact) at B bits per expert weight as the GGUF
  file counts them (block scales included), one exact ggml type per (layer, projection): [L, 3, E];
  or a comma list of per-layer codes (cycled): [L, E]; or a JSON file of [L][E] or [L][3][E] codes
  (the hook for any allocator's output). Mixed codes inside one layer's tensor share one ggml type
  there, and the table then marks the row as widened.
  """
  layers, experts = cfg.num_layers, cfg.num_experts
  if arg.startswith("gguf:"):
    import jax
    from moeqjax.alloc.gguf_target import allocate_gguf
    from moeqjax.train import init_router_stats
    try:
      bits = float(arg.split(":", 1)[1])
    except ValueError:
      raise SystemExit(f"--mixed-codes {arg!r}: give gguf:BITS, e.g. gguf:2.5") from None
    # Random weights have no router statistics: every expert ranks alike, and the solver spends
    # the bytes where the relative weight error falls most (speed depends on the types only).
    stats = jax.device_get(init_router_stats(params, layers))
    return np.asarray(allocate_gguf("exact", cfg, params, stats, bits, "bits").codes_LxE)
  if os.path.isfile(arg):
    codes = np.asarray(json.loads(pathlib.Path(arg).read_text()), np.int64)
    if codes.shape not in ((layers, experts), (layers, 3, experts)):
      raise SystemExit(f"--mixed-codes {arg} holds shape {list(codes.shape)}; this model needs "
                       f"[layers, experts] = [{layers}, {experts}] or [layers, 3, experts]")
  else:
    try:
      per_layer = [int(c) for c in arg.split(",")]
    except ValueError:
      raise SystemExit(f"--mixed-codes {arg!r} is neither gguf:BITS, a file nor a comma list of "
                       "codes such as 1,4") from None
    codes = np.asarray([[per_layer[i % len(per_layer)]] * experts for i in range(layers)])
  bad = sorted(set(codes.ravel().tolist()) - {1, 2, 3, 4, 8})
  if bad:
    raise SystemExit(f"--mixed-codes has codes {bad}; use 1 (ternary), 2, 3, 4 or 8")
  return codes


def _expert_types(report) -> tuple[str, bool]:
  """'TQ2_0 x16, Q4_0 x8' over the expert tensors (three a layer), and whether any was widened."""
  counts = {}
  for r in report["tensors"]:
    if r["name"].endswith("_exps.weight"):
      counts[r["ggml_type"]] = counts.get(r["ggml_type"], 0) + 1
  return ", ".join(f"{t} x{n}" for t, n in counts.items()), bool(report["widened"])


def _code_summary(codes_LxE) -> str:
  """'int4' for one code; 'ternary x4, int4 x4' (layers) for a per-layer mix; else the shares of
  expert matrices (per projection with [L, 3, E] codes)."""
  name = lambda c: "ternary" if c == 1 else f"int{c}"
  values = sorted(set(codes_LxE.ravel().tolist()))
  if codes_LxE.ndim == 3:
    return ", ".join(f"{name(c)} {np.mean(codes_LxE == c):.0%}" for c in values) + (
        " of expert matrices")
  if len(values) == 1:
    return name(values[0])
  if all(len(set(row.tolist())) == 1 for row in codes_LxE):
    return ", ".join(f"{name(c)} x{int(np.sum(codes_LxE[:, 0] == c))}" for c in values)
  return ", ".join(f"{name(c)} {np.mean(codes_LxE == c):.0%}" for c in values) + " of experts"


def codes_of(quant) -> np.ndarray:
  """The [L, E] (or [L, 3, E]) expert codes of a `quant` collection."""
  from moeqjax.model import expert_codes
  return np.asarray(expert_codes(quant, len([k for k in quant if k.startswith("layers_")])))


def _write_gguf(v: Variant, cfg, params, quant, workdir: pathlib.Path) -> dict:
  """The llama.cpp row of a variant: its GGUF file (non-expert matrices F16)."""
  from moeqjax.convert.gguf_export import write_gguf
  from moeqjax.convert.student_weights import ParamWeights
  path = workdir / f"{v.key}.gguf"
  report = write_gguf(ParamWeights(cfg, params, quant), path, fp_dtype="f16", overwrite=True)
  types, widened = _expert_types(report)
  name = v.llama_name
  if v.code == "mixed":
    codes = np.asarray(codes_of(quant))
    per_layer = codes.ndim == 2 and all(len(set(row.tolist())) == 1 for row in codes)
    mix = ("per-layer mix" if per_layer else
           "target-aware mix" if codes.ndim == 3 else "mix")
    name = f"{mix} ({types})" + (" WIDENED" if widened else "")
  return {"runtime": LLAMA, "variant": v.key, "name": name, "kind": "gguf", "path": str(path),
          "file_bytes": path.stat().st_size, "expert_types": types, "widened": widened}


def _write_moeqjax(v: Variant, cfg, params, quant, codes, workdir: pathlib.Path) -> dict:
  """The JAX row of a variant: bf16 params in a safetensors file, or a `pack` folder."""
  import ml_dtypes
  from moeqjax.convert.safetensors_io import StreamingWriter
  import jax
  from moeqjax.serve import pack
  folder = workdir / f"{v.key}.moeqjax"
  shutil.rmtree(folder, ignore_errors=True)
  if codes is None:  # the unquantized baseline: every param at bf16, config.json beside them
    folder.mkdir()
    flat = [("/".join(k.key for k in p), np.asarray(w, ml_dtypes.bfloat16))
            for p, w in jax.tree_util.tree_flatten_with_path(params)[0]]
    writer = StreamingWriter(folder / "params.safetensors",
                             [(n, a.shape, a.dtype) for n, a in flat])
    for n, a in flat:
      writer.write(n, a)
    writer.close()
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    kind, path, types = "bf16", folder / "params.safetensors", "bf16"
  else:
    pack(cfg, params, quant, folder, fp_dtype="bfloat16")
    kind, path = "packed", folder
    types = _code_summary(codes) + (" (base-3)" if v.packing == "base3" else "")
  if v.code == "mixed":
    mix = ("target-aware mix" if "matrices" in types else
           "mix" if "experts" in types else "per-layer mix")
    name = f"packed {mix} ({types})"
  else:
    name = v.jax_name
  return {"runtime": JAX, "variant": v.key, "name": name, "kind": kind, "path": str(path),
          "file_bytes": sum(f.stat().st_size for f in folder.iterdir()), "expert_types": types,
          "widened": False}


def build(args, workdir: pathlib.Path) -> list[dict]:
  """Writes every GGUF file and moeqjax checkpoint; returns one row per (runtime, variant)."""
  import jax
  from moeqjax.model import default_quant, init_model, set_expert_codes

  cfg = model_config(args, "2bit")
  _, params, _ = init_model(cfg, jax.random.key(args.seed))
  params = jax.device_get(params)
  codes_mixed = mixed_codes(args.mixed_codes, cfg, params)
  rows = []
  for v in VARIANTS:
    t0 = time.perf_counter()
    vcfg = model_config(args, v.packing)
    codes = None
    if v.code == "mixed":
      codes = codes_mixed
    elif v.code is not None:
      codes = np.full((cfg.num_layers, cfg.num_experts), v.code)
    quant = None if codes is None else set_expert_codes(default_quant(vcfg), codes)
    if "llama" in args.runtimes:
      rows.append(_write_gguf(v, vcfg, params, quant, workdir))
    if "jax" in args.runtimes:
      rows.append(_write_moeqjax(v, vcfg, params, quant, codes, workdir))
    print(f"  wrote {v.key} ({time.perf_counter() - t0:.1f} s): " + ", ".join(
        f"{r['runtime']} {_mib(r['file_bytes'])} MiB ({r['expert_types']})"
        for r in rows if r["variant"] == v.key), file=sys.stderr, flush=True)
  return rows


class Worker:
  """A worker process for one (row, thread count), driven over its stdin / stdout."""

  def __init__(self, row: dict, threads: int, common: dict, verbose: bool):
    self.row, self.threads = row, threads
    spec = dict(common, threads=threads, path=row["path"], kind=row["kind"])
    role = "llama" if row["runtime"] == LLAMA else "jax"
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", role, json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        stderr=None if verbose else subprocess.DEVNULL)
    self.ready = None

  def wait_ready(self) -> dict:
    self.ready = self._read()
    return self.ready

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(MARK):
        return json.loads(line[len(MARK):])
    raise RuntimeError(f"the {self.row['runtime']} worker for {self.row['name']} at "
                       f"{self.threads} thread(s) exited (code {self.proc.wait()}); rerun with "
                       "--verbose to see its log")

  def run(self) -> dict:
    self.proc.stdin.write("run\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    try:
      self.proc.stdin.close()  # end of input: the worker exits
    except BrokenPipeError:  # it has already exited (its error is being reported)
      pass
    self.proc.wait()


def measure(args, rows: list[dict], workdir: pathlib.Path) -> dict:
  """{(row index, threads): {"ready": memory record, "runs": [per-round results]}}."""
  rng = np.random.default_rng(args.seed)
  common = {"prompt": rng.integers(0, 256, args.prompt).tolist(), "new_tokens": args.new_tokens,
            "load_mode": args.llama_load}
  out = {}
  # One compilation cache for all thread counts: an XLA:CPU executable does not depend on the
  # thread count (its thread pool is the runtime's), so later workers only look theirs up.
  common["jax_cache"] = str(workdir / "jax_cache")
  for threads in args.threads:
    workers = []
    try:
      # Loading and warm-up are not timed, and each worker's memory is its own process's, so
      # two start at a time (one per core of the reference machine); more would only add their
      # peaks (a packed JAX load peaks at several times its weights). The timed rounds start once
      # every worker is ready.
      t0 = time.perf_counter()
      for i, row in enumerate(rows):
        if len(workers) >= args.start_jobs and workers[-args.start_jobs][1].ready is None:
          workers[-args.start_jobs][1].wait_ready()
        workers.append((i, Worker(row, threads, common, args.verbose)))
      for _, w in workers:
        if w.ready is None:
          w.wait_ready()
      print(f"  {threads} thread(s): {len(workers)} workers loaded and warmed up "
            f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
      for r in range(args.rounds):
        t0 = time.perf_counter()
        for i, w in workers:
          out.setdefault((i, threads), {"ready": w.ready, "runs": []})["runs"].append(w.run())
        print(f"  {threads} thread(s): round {r + 1}/{args.rounds} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    finally:
      for _, w in workers:
        w.close()
  return out


def _stats(values) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(args, rows, results) -> list[dict]:
  """One record per (row, threads) with medians, ranges and ratios to its runtime's base row."""
  records = []
  for (i, threads), res in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    row = rows[i]
    rec = {k: row[k] for k in ("runtime", "variant", "name", "file_bytes", "expert_types",
                               "widened")}
    rec.update({"threads": threads,
                **{k: res["ready"][k] for k in ("rss_load", "peak_load", "rss_run", "peak")},
                "prefill": _stats([x["prefill"] for x in res["runs"]]),
                "decode": _stats([x["decode"] for x in res["runs"]]),
                "runs": res["runs"]})
    records.append(rec)
  for rec in records:
    base = next(b for b in records if b["runtime"] == rec["runtime"]
                and b["threads"] == rec["threads"] and b["variant"] == "fp")
    rec["ratio"] = {k: rec[k] / base[k] for k in ("file_bytes", "rss_load")}
    rec["ratio"].update({k: rec[k]["median"] / base[k]["median"] for k in ("prefill", "decode")})
  return records


def _mib(n) -> str:
  return f"{n / 2**20:,.1f}"


def _speed(s) -> str:
  return f"{s['median']:,.1f} [{s['min']:,.1f}-{s['max']:,.1f}]"


def print_tables(args, records):
  first = min(args.threads)
  print("\n### Size and resident memory (ratio = row / F16 for llama.cpp, row / bf16 for JAX)\n")
  print(f"Resident memory: each worker process's VmRSS (and peak: VmHWM) from /proc/self/status "
        f"minus its VmRSS before loading (runtime started, nothing loaded), in its {first}-thread "
        f"worker; after load, and after one warm-up generation; llama.cpp load mode "
        f"{args.llama_load}.\n")
  print("| runtime | row | expert tensors | file MiB | x | RSS after load MiB | x "
        "| peak RSS in load MiB | RSS after warm-up MiB | peak RSS MiB |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in records:
    if r["threads"] != first:
      continue
    print(f"| {r['runtime']} | {r['name']} | {r['expert_types']} | {_mib(r['file_bytes'])} "
          f"| {r['ratio']['file_bytes']:.2f} | {_mib(r['rss_load'])} "
          f"| {r['ratio']['rss_load']:.2f} "
          f"| {_mib(r['peak_load'])} | {_mib(r['rss_run'])} | {_mib(r['peak'])} |")
  print(f"\n### Speed at batch 1: {args.prompt}-token prompt, {args.new_tokens} greedy tokens; "
        f"tok/s median [min-max] of {args.rounds} interleaved rounds; x = median / base row's "
        f"median at the same thread count\n")
  print("| runtime | row | threads | prefill tok/s | x | decode tok/s | x |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for r in records:
    print(f"| {r['runtime']} | {r['name']} | {r['threads']} | {_speed(r['prefill'])} "
          f"| {r['ratio']['prefill']:.2f} | {_speed(r['decode'])} | {r['ratio']['decode']:.2f} |")


def _machine() -> dict:
  import importlib.metadata
  cpu = next((line.split(":", 1)[1].strip() for line in
              pathlib.Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")), platform.processor())
  vers = {d: importlib.metadata.version(d) for d in ("jax", "xllamacpp", "gguf")}
  return {"cpu": cpu, "cpus_allowed": len(os.sched_getaffinity(0)),
          "python": platform.python_version(),
          "load_avg_at_start": os.getloadavg(), **vers}


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--small", action="store_true",
                  help="a tiny model (D=256, F=512, E=4, 2 layers), 16-token prompt, 16 new "
                  "tokens, 2 rounds, 1 thread unless --threads is given: checks the script in "
                  "about a minute")
  ap.add_argument("--d-model", type=int, default=1024, help="model width D (multiple of 256)")
  ap.add_argument("--d-ff", type=int, default=2048, help="expert hidden size F (multiple of 256)")
  ap.add_argument("--experts", type=int, default=8, help="routed experts E per layer")
  ap.add_argument("--top-k", type=int, default=2, help="experts per token k")
  ap.add_argument("--layers", type=int, default=8, help="transformer layers L")
  ap.add_argument("--heads", type=int, default=8, help="query heads (head_dim = D / heads)")
  ap.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
  ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill, batch 1)")
  ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per run")
  ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (median, range)")
  ap.add_argument("--threads", help="comma list of thread counts, each pinned to that many CPUs "
                  "(default 1,2; with --small, 1)")
  ap.add_argument("--runtimes", default="llama,jax", help="comma list from llama, jax")
  ap.add_argument("--mixed-codes", default="gguf:2.5",
                  help="the mixed row: gguf:BITS (default gguf:2.5), the target-aware allocation "
                  "(`allocate --target gguf`, method exact) at BITS per expert weight in GGUF "
                  "bytes with block scales, one exact type per (layer, projection), so no tensor "
                  "widens; or per-layer codes cycled over layers, e.g. 1,4; or a JSON file with "
                  "[layers][experts] or [layers][3][experts] codes, e.g. from an allocator")
  ap.add_argument("--llama-load", default="none", choices=("none", "mmap"),
                  help="llama.cpp load mode: none reads weights into memory at load (default); "
                  "mmap maps the file")
  ap.add_argument("--start-jobs", type=int, default=2,
                  help="workers loading at the same time (memory: their load peaks add up)")
  ap.add_argument("--seed", type=int, default=0, help="weights and prompt")
  ap.add_argument("--workdir", help="keep the GGUF files and checkpoints here (default: a "
                  "temporary folder, removed at the end)")
  ap.add_argument("--json", help="also write every measurement and the settings to this file")
  ap.add_argument("--verbose", action="store_true", help="show the workers' logs on stderr")
  args = ap.parse_args(argv)
  if args.small:
    args.d_model, args.d_ff, args.experts, args.layers = 256, 512, 4, 2
    args.heads, args.kv_heads, args.prompt, args.new_tokens, args.rounds = 4, 2, 16, 16, 2
  threads = args.threads or ("1" if args.small else "1,2")
  args.threads = sorted({int(t) for t in threads.split(",")})
  args.runtimes = [r.strip() for r in args.runtimes.split(",")]
  if set(args.runtimes) - {"llama", "jax"}:
    ap.error(f"--runtimes {args.runtimes}: choose from llama, jax")
  for name in ("d_model", "d_ff"):
    if getattr(args, name) % 256:
      ap.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not a multiple of 256, the "
               "row length of a TQ1_0 / TQ2_0 block")
  if args.d_model % args.heads or args.heads % args.kv_heads:
    ap.error(f"--heads {args.heads} must divide --d-model and be a multiple of --kv-heads")
  if args.start_jobs < 1:
    ap.error("--start-jobs must be at least 1")
  if args.rounds < 1 or args.new_tokens < 2 or args.prompt < 1:
    ap.error("need --rounds >= 1, --new-tokens >= 2 (decode speed needs two tokens), --prompt >= 1")
  return args


def main():
  if len(sys.argv) == 4 and sys.argv[1] == "--worker":
    (llama_worker if sys.argv[2] == "llama" else jax_worker)(json.loads(sys.argv[3]))
    return
  args = parse_args()
  start = time.perf_counter()
  machine = _machine()
  print(f"model: D={args.d_model}, expert F={args.d_ff}, E={args.experts}, k={args.top_k}, "
        f"{args.layers} layers, {args.heads} heads ({args.kv_heads} kv), byte vocab 256; "
        f"{args.layers * args.experts * 3 * args.d_model * args.d_ff / 1e6:.0f}M expert weights; "
        f"{machine['cpu']}, {machine['cpus_allowed']} CPUs, load average "
        f"{machine['load_avg_at_start'][0]:.2f} at start", file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(args.workdir or tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = build(args, workdir)
    build_s = time.perf_counter() - start
    results = measure(args, rows, workdir)
  records = summarize(args, rows, results)
  wall = time.perf_counter() - start
  print_tables(args, records)
  print(f"\nSpeeds: llama.cpp's own timings (prompt_per_second, predicted_per_second) and "
        f"moeqjax.serve.generate's; {machine['cpu']}, {machine['cpus_allowed']} CPUs; "
        f"xllamacpp {machine['xllamacpp']}, jax {machine['jax']}; wall time {wall:.0f} s "
        f"(building the files {build_s:.0f} s).")
  if args.json:
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "workdir", "verbose")}
    pathlib.Path(args.json).write_text(json.dumps(
        {"settings": settings, "machine": machine, "wall_s": wall, "build_s": build_s,
         "rows": records}, indent=2) + "\n")


if __name__ == "__main__":
  main()
