"""Trains like test_resume.py's runs and SIGKILLs itself inside orbax's save of step 4.

The kill lands in AtomicRenameTemporaryPath.finalize, after every array and metadata file of the
step was written to `4.orbax-checkpoint-tmp` and before the rename to `4` that commits it.
"""

import os
import signal
import sys

from orbax.checkpoint._src.path import atomicity

from test_resume import _run

KILL_AT = "4"


def main(workdir: str) -> None:
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def killed_finalize(self):
    if self._final_path.name == KILL_AT:  # step 2's save commits as usual
      os.kill(os.getpid(), signal.SIGKILL)
    await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = killed_finalize
  _run(workdir, resume=False)
  raise SystemExit("the save of step 4 was not reached")


if __name__ == "__main__":
  main(sys.argv[1])
