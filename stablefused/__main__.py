import signal
import sys


def _interrupted_early(signum, frame):  # Ctrl-C / SIGTERM while Python imports torch, Hydra composes, ...
    name = signal.Signals(signum).name
    print(f"interrupted ({name}) outside a run (starting up or wrapping up); every finished output is kept",
          file=sys.stderr)
    sys.stderr.flush()
    import os

    os._exit(128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(_sig) is not signal.SIG_IGN:  # an ignored signal stays ignored (nohup, `cmd &`), as Python does
        signal.signal(_sig, _interrupted_early)

from stablefused.app import main  # noqa: E402  (after the handlers: imports take seconds)

if __name__ == "__main__":
    main()
