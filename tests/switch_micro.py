"""configs/switch_tiny.py at a test's size, as a config file the CLI reads (shared by the Switch CLI
tests): 1+1 layers, both sparse, 4 experts, 48-byte windows."""

import pathlib
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]


def micro_config(pre_steps: int, qat_steps: int) -> str:
  """The text of a config file: switch_tiny at the test size, pretrain / qat at these steps."""
  return textwrap.dedent(f'''
      import importlib.util

      def get_config():
        path = {str(REPO / "configs" / "switch_tiny.py")!r}
        spec = importlib.util.spec_from_file_location("switch_tiny", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        c.model.update(dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
                            num_decoder_layers=1, num_sparse_encoder_layers=1,
                            num_sparse_decoder_layers=1, num_experts=4, expert_capacity=10,
                            relative_attention_num_buckets=16, relative_attention_max_distance=64))
        c.seq2seq.window = 48
        c.pretrain.update(dict(steps={pre_steps}, batch_size=8, seq_len=48, ckpt_every=0, seed=0))
        c.qat.update(dict(steps={qat_steps}, batch_size=8, seq_len=48, ckpt_every=0, seed=1))
        c.eval.update(dict(num_batches=4, batch_size=8))
        return c
      ''')


def restore(config_path, run_dir, steps: int, phase: str, codes=None, control: bool = False):
  """(cfg, params, quant) of a CLI run's last checkpoint (at `steps`), restored by the library
  alone: "pretrain" (quant None) or "qat" (`control`: quant.expert_code 0; `codes`: an allocation)."""
  import jax

  from moeqjax.model import default_quant, init_switch, set_expert_codes
  from moeqjax.pipeline.config import load_config, switch_config
  from moeqjax.train import Checkpointer, OptimConfig, create_state, make_optimizer

  config = load_config(config_path)
  if control:
    config.quant.expert_code = 0
  cfg = switch_config(config)
  tx = make_optimizer(OptimConfig(1e-3, 1, steps, 0.1, 0.0, 1.0))

  def build():
    params = init_switch(cfg, jax.random.key(0))[1]
    if phase == "pretrain":
      return create_state(params, tx, None)
    quant = default_quant(cfg) if codes is None else set_expert_codes(default_quant(cfg), codes)
    return create_state(params, tx, None, quant=quant, teacher_params=params)

  ckpt = Checkpointer(pathlib.Path(run_dir) / "ckpt", every=0)
  try:
    assert ckpt.latest_step() == steps
    parts = ("params",) if phase == "pretrain" else ("params", "quant")
    state = ckpt.restore(jax.eval_shape(build), steps, parts=parts)
  finally:
    ckpt.close()
  return cfg, state.params, state.quant
