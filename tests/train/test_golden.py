"""Golden metrics after a few QAT steps on a fixed tiny setup.

If this fails after an intended change to the model, quantizers, objective or optimizer (and the
oracle tests still pass), regenerate the numbers with
`python tests/train/test_golden.py` and paste them here, saying why in the commit message.
An unintended change in these numbers is a regression.
"""

import jax
import jax.numpy as jnp
import numpy as np

from helpers_train import JOINT, make_states, synthetic_tokens
from moeqjax.data import sample_batch
from moeqjax.train import jit_train_step

KEYS = ("train/loss", "train/task", "train/rec", "train/kd", "train/value", "train/struct")
GOLDEN = {"history": [
    [4.991239070892334, 4.5568084716796875, 0.1150306835770607, 0.23500731587409973,
     0.04193023592233658, 0.10060468316078186],
    [5.181620121002197, 4.698060035705566, 0.1274472028017044, 0.24862845242023468,
     0.07333873212337494, 0.11419624090194702],
    [4.849477767944336, 4.466827392578125, 0.11344258487224579, 0.17701351642608643,
     0.04994431138038635, 0.10582832247018814],
    [4.895963191986084, 4.441831111907959, 0.1229328066110611, 0.2136433720588684,
     0.06280409544706345, 0.14440514147281647],
]}


def golden_run():
  _, model, tx, state = make_states(qat=True, lr=3e-3, steps=10)
  step = jit_train_step(model, tx, JOINT)
  tokens = synthetic_tokens()
  history = []
  for i in range(4):
    batch = jnp.asarray(sample_batch(tokens, 4, 16, seed=0, step=i))
    state, m = step(state, batch, jax.random.key(i))
    history.append([float(m[k]) for k in KEYS])
  return np.asarray(history)


def test_golden_metrics():
  got = golden_run()
  want = np.asarray(GOLDEN["history"])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6,
                             err_msg="golden QAT metrics moved; see the module docstring")


if __name__ == "__main__":
  print(repr(golden_run().tolist()))
